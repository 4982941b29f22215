"""Progress within an epoch as a person sees it: a bar with numbers in a terminal,
plain lines in a pipe, nothing with --quiet."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest

from resnet_graph.progress import epoch_progress

EXE = os.path.join(os.path.dirname(sys.executable), "resnet-graph")
# 250 training images in batches of 10: 25 steps in the one epoch.
ARGS = ["train", "original", "--depth", "8", "--epochs", "1", "--batch-size", "10",
        "--valid-size", "50", "--precision", "fp32"]
LINE = re.compile(r"epoch 1/1 step (\d+)/25 \((\d+)%\): loss \d+\.\d{4} acc \d\.\d{4}  "
                  r"\d+ img/s  ETA \d+:\d\d")


def _args(tiny_data_dir, tmp_path, *extra):
    return [EXE, *ARGS, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), *extra]


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RESNET_GRAPH_DATA_DIR", None)
    return env


def test_plain_lines_about_every_tenth_of_an_epoch():
    lines = []
    progress = epoch_progress("epoch 2/5", 0, 100, 128, enabled=True, log=lines.append,
                              terminal=False)
    for step in range(100):
        progress.update(step, loss_sum=2.0 * (step + 1), hits=0.25 * (step + 1),
                        images_per_sec=256.0)
    progress.close()
    assert len(lines) == 9
    assert lines[0] == "epoch 2/5 step 10/100 (10%): loss 2.0000 acc 0.2500  256 img/s  ETA 0:45"
    assert lines[-1].startswith("epoch 2/5 step 90/100 (90%)")
    quiet = []
    progress = epoch_progress("e", 0, 100, 128, enabled=False, log=quiet.append, terminal=False)
    for step in range(100):
        progress.update(step, 1.0, 1.0, 1.0)
    assert not quiet


def test_a_terminal_shows_a_bar_with_loss_accuracy_and_speed(tiny_data_dir, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(_args(tiny_data_dir, tmp_path), stdin=slave, stdout=slave,
                            stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            try:
                data = os.read(master, 65536)
            except OSError:      # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    bars = [part for part in re.split(r"[\r\n]", screen) if "epoch 1/1:" in part]
    assert bars, screen
    assert any(re.search(r"loss=\d+\.\d{3}, acc=\d\.\d{3}, img_s=\d+", b) for b in bars), bars
    assert not LINE.search(screen)       # no plain lines in a terminal


def test_a_pipe_gets_plain_progress_lines(tiny_data_dir, tmp_path):
    proc = subprocess.run(_args(tiny_data_dir, tmp_path), capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = [m.groups() for m in LINE.finditer(proc.stdout)]
    # ceil(25 / 10) = 3: steps 3, 6, ..., 24.
    assert [int(step) for step, _ in found] == list(range(3, 25, 3)), proc.stdout
    assert "epoch 1/1  train loss" in proc.stdout      # then the epoch line
    assert "it/s" not in proc.stderr and "step/s" not in proc.stderr   # no bar anywhere


@pytest.mark.parametrize("terminal", [False, True])
def test_quiet_prints_neither(tiny_data_dir, tmp_path, terminal):
    if terminal:
        master, slave = pty.openpty()
        proc = subprocess.run(_args(tiny_data_dir, tmp_path, "--quiet"), stdin=slave,
                              stdout=slave, stderr=slave, env=_env(), timeout=300)
        os.close(slave)
        out = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
        os.close(master)
        text = out.decode("utf-8", "replace")
    else:
        proc = subprocess.run(_args(tiny_data_dir, tmp_path, "--quiet"), capture_output=True,
                              text=True, env=_env(), timeout=300)
        text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "epoch 1/1" not in text, text
