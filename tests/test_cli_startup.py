"""``--help`` answers without importing TensorFlow (a 5-second import here).

The pytest process has TensorFlow imported already, so each check runs in a
fresh interpreter.
"""

import subprocess
import sys

from resnet_graph.cli import cli

CHECK = """
import sys
from click.testing import CliRunner
from resnet_graph.cli import cli
for args in {cases!r}:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, (args, result.output)
    assert "Usage:" in result.output, (args, result.output)
    assert "tensorflow" not in sys.modules, f"{{args}} imported TensorFlow"
print("ok", len({cases!r}))
"""


def test_help_of_every_command_answers_without_tensorflow():
    cases = [["--help"]] + [[name, "--help"] for name in sorted(cli.commands)]
    assert ["train", "--help"] in cases
    done = subprocess.run([sys.executable, "-c", CHECK.format(cases=cases)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ok", str(len(cases))]


def test_a_usage_error_answers_without_tensorflow():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom resnet_graph.cli import cli\n"
            "r = CliRunner().invoke(cli, ['train', 'original', '--depth', '9'])\n"
            "assert r.exit_code == 2, r.output\nprint('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_a_reader_that_goes_away_ends_the_program_with_141_and_no_message():
    # `resnet-graph recipes --json | head -c 0`: the pipe is closed before anything is
    # written, so the write meets EPIPE (Python ignores SIGPIPE), as a shell's early reader.
    import os
    exe = os.path.join(os.path.dirname(sys.executable), "resnet-graph")
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([exe, "recipes", "--json"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""
