"""docs/cli.md and the click app name the same commands and options.

docs/cli.md has a section ``## resnet-graph <command>`` per command (``## resnet-graph``
alone for the options that go before the command) with a table whose header starts with
``option``; the first cell of each row spells one or more options (``--name VALUE``,
``--flag / --no-flag``). These tests check both directions: every documented option
exists, and every option of the app is documented, so an option cannot be added,
renamed or dropped without its row in docs/cli.md changing too.

No TensorFlow: the click objects are built without it.
"""

import pathlib
import re

import click
import pytest

from resnet_graph.cli import cli

CLI_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "cli.md"

SECTION = re.compile(r"^##\s+resnet-graph(?:\s+(?P<command>\S+))?\s*$")
HEADING = re.compile(r"^#{1,2}\s")
OPTION = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*|-[A-Za-z])(?![\w-])")
BACKTICKED = re.compile(r"`([^`]+)`")
GROUP = ""   # the key of the options that go before the command


def _cells(line: str) -> list:
    """The cells of a markdown table row (``\\|`` inside a cell is not a separator)."""
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") and not body.endswith("\\|") else body
    return [c.strip() for c in re.split(r"(?<!\\)\|", body)]


def _is_separator(cells: list) -> bool:
    return all(re.fullmatch(r":?-{3,}:?", c) for c in cells if c)


def parse_cli_doc(text: str):
    """The commands and options that a docs/cli.md text documents.

    Returns ``(options, rows)``: ``options`` maps each command name (``""`` for the
    group's own options) to the set of options in the first column of its option
    tables (a section without such a table maps to an empty set); ``rows`` maps
    ``(command, option)`` to the text of the row that documents it. Tables whose
    header does not start with ``option`` (JSON fields, files, ...) and tables outside
    a ``## resnet-graph ...`` section are ignored.
    """
    options, rows = {}, {}
    command = None          # None: not inside a command section
    in_option_table = False
    previous_is_row = False
    for line in text.splitlines():
        match = SECTION.match(line)
        if match:
            command = match.group("command") or GROUP
            options.setdefault(command, set())
            in_option_table = previous_is_row = False
            continue
        if HEADING.match(line):       # another section (# or ##) ends the command's
            command = None
            in_option_table = previous_is_row = False
            continue
        if not line.lstrip().startswith("|"):
            in_option_table = previous_is_row = False
            continue
        cells = _cells(line)
        if not previous_is_row:       # a table's header row
            in_option_table = bool(cells) and cells[0].strip("` ").lower() == "option"
            previous_is_row = True
            continue
        previous_is_row = True
        if command is None or not in_option_table or _is_separator(cells):
            continue
        for name in OPTION.findall(cells[0]):
            options[command].add(name)
            rows[(command, name)] = line
    return options, rows


def _param_options(params) -> set:
    names = set()
    for param in params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names - {"--help", "-h"}


def app_options(group: click.Group) -> dict:
    """Each command's options (``""``: the group's own), without the help option."""
    found = {GROUP: _param_options(group.params)}
    for name, command in group.commands.items():
        found[name] = _param_options(command.params)
    return found


def contract_differences(documented: dict, app: dict) -> list:
    """Every disagreement between the documented and the real commands and options."""
    problems = []
    label = lambda c: f"resnet-graph {c}".rstrip()  # noqa: E731
    for command in sorted(set(app) - set(documented)):
        problems.append(f"{label(command)}: no '## {label(command)}' section in docs/cli.md")
    for command in sorted(set(documented) - set(app)):
        problems.append(f"{label(command)}: documented, but the app has no such command")
    for command in sorted(set(app) & set(documented)):
        for name in sorted(documented[command] - app[command]):
            problems.append(f"{label(command)}: {name} is documented but does not exist")
        for name in sorted(app[command] - documented[command]):
            problems.append(f"{label(command)}: {name} exists but is not documented")
    return problems


def choice_differences(text: str, group: click.Group) -> list:
    """Choices of an option that no row documenting it names in backticks (for an
    argument such as MODEL: that the text names nowhere in backticks)."""
    problems = []
    _, rows = parse_cli_doc(text)
    commands = dict(group.commands, **{GROUP: group})
    everywhere = set(BACKTICKED.findall(text))
    for command_name, command in commands.items():
        for param in command.params:
            if not isinstance(param.type, click.Choice):
                continue
            if isinstance(param, click.Argument):
                named, where = everywhere, f"argument {param.human_readable_name}"
            else:
                named = set()
                for name in param.opts:   # any command's row for this option may list them
                    for (_, option), line in rows.items():
                        if option == name:
                            named.update(BACKTICKED.findall(line))
                where = param.opts[0]
            missing = [c for c in param.type.choices if str(c) not in named]
            if missing:
                problems.append(f"resnet-graph {command_name} {where}: choices "
                                f"{', '.join(map(str, missing))} are not in docs/cli.md")
    return problems


def test_every_documented_option_exists_and_every_option_is_documented():
    documented, _ = parse_cli_doc(CLI_DOC.read_text(encoding="utf-8"))
    assert "train" in documented and "--epochs" in documented["train"]   # the parser works
    problems = contract_differences(documented, app_options(cli))
    assert not problems, "docs/cli.md and the app disagree:\n" + "\n".join(problems)


def test_every_choice_is_documented():
    text = CLI_DOC.read_text(encoding="utf-8")
    problems = choice_differences(text, cli)
    assert not problems, "\n".join(problems)
    # The check can fail: a row that forgets a choice is reported.
    tta_row = next(line for line in text.splitlines() if line.startswith("| `--tta NAME`"))
    forgetful = text.replace(tta_row, tta_row.replace("`flip`", "flip"))
    assert choice_differences(forgetful, cli) == [
        "resnet-graph eval --tta: choices flip are not in docs/cli.md"]


SMALL_DOC = """\
# Title

## resnet-graph
| option | meaning |
| --- | --- |
| `--version` | the version |

## resnet-graph train

| option | default | meaning |
| --- | --- | --- |
| `--depth INT` | 32 | see also --not-parsed-outside-the-first-column |
| `--augment / --no-augment` | off | a pair |

| field | meaning |
| --- | --- |
| `--json-field` | not an option table |

## Files
| option | meaning |
| --- | --- |
| `--not-a-command-option` | outside any command section |
"""


def test_the_parser_reads_only_option_tables_of_command_sections():
    documented, rows = parse_cli_doc(SMALL_DOC)
    assert documented == {GROUP: {"--version"}, "train": {"--depth", "--augment", "--no-augment"}}
    assert "32" in rows[("train", "--depth")]


def test_the_check_fails_on_a_wrong_or_a_missing_option():
    app = app_options(cli)
    text = CLI_DOC.read_text(encoding="utf-8")
    seed_row = next(line for line in text.splitlines() if line.startswith("| `--seed INT`"))
    # A documented option that the app lacks is reported...
    wrong = text.replace(seed_row, seed_row + "\n| `--no-such-option INT` | 0 | made up |", 1)
    problems = contract_differences(parse_cli_doc(wrong)[0], app)
    assert problems == ["resnet-graph train: --no-such-option is documented but does not exist"]
    # ...and so is an option of the app that the text leaves out...
    missing = text.replace(seed_row + "\n", "", 1)
    problems = contract_differences(parse_cli_doc(missing)[0], app)
    assert problems == ["resnet-graph train: --seed exists but is not documented"]
    # ...and a command without its section.
    no_info = re.sub(r"^## resnet-graph info$", "## The info command", text, flags=re.M)
    problems = contract_differences(parse_cli_doc(no_info)[0], app)
    assert "resnet-graph info: no '## resnet-graph info' section in docs/cli.md" in problems


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_section_shows_its_usage(command):
    """Each command's section starts with a usage line naming the command."""
    text = CLI_DOC.read_text(encoding="utf-8")
    section = text.split(f"\n## resnet-graph {command}\n", 1)[1].split("\n## ", 1)[0]
    assert f"`resnet-graph {command}" in section
