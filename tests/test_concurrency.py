"""Several training processes at once: a shared history file, and one run name twice."""

import os
import signal
import subprocess
import sys
import time

from resnet_graph import history

EXE = os.path.join(os.path.dirname(sys.executable), "resnet-graph")


def train_args(data_dir, out, *extra, epochs=2, name=None):
    args = [EXE, "train", "original", "--depth", "8", "--batch-size", "50", "--valid-size",
            "50", "--epochs", str(epochs), "--data-dir", str(data_dir), "--out", str(out),
            "--quiet"]
    return args + (["--name", name] if name else []) + list(extra)


def start(args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def one_error_line(err):
    """The CLI contract: one line ``Error: ...`` and no traceback (TensorFlow's own
    start-up chatter on stderr aside)."""
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    return len(errors) == 1 and "Traceback" not in err


def test_two_runs_write_one_history_file_at_once(tiny_data_dir, tmp_path):
    procs = [start(train_args(tiny_data_dir, tmp_path, epochs=3, name=name))
             for name in ("first", "second")]
    results = [finish(p) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    runs = {r.name: r for r in history.read_history(tmp_path / "histories.h5")}
    assert sorted(runs) == ["first", "second"]
    for run in runs.values():
        assert list(run.columns["epoch"]) == [1, 2, 3]
        assert "test_acc" in run.attrs and run.attrs["best_epoch"] >= 1
    # Both wrote with the same seed and options: the same numbers, each in its own group.
    assert list(runs["first"].columns["valid_acc"]) == list(runs["second"].columns["valid_acc"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_one_run_name_started_twice_at_once_trains_once(tiny_data_dir, tmp_path):
    procs = [start(train_args(tiny_data_dir, tmp_path)) for _ in range(2)]
    results = sorted((finish(p) for p in procs), key=lambda r: r[0])
    (rc_ok, _), (rc_refused, err) = results
    assert (rc_ok, rc_refused) == (0, 1), results
    assert one_error_line(err), err
    # Refused by the run folder's lock or, when the winner had already written into
    # the folder, as an existing run; either way the winner's run is complete.
    assert "in use by another training process" in err or "already exists" in err, err
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs


def test_resume_of_a_run_that_is_training_is_refused_by_the_lock(tiny_data_dir, tmp_path):
    first = start(train_args(tiny_data_dir, tmp_path, epochs=200))
    state = tmp_path / "original-8" / "checkpoint"
    deadline = time.monotonic() + 120
    while not state.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, finish(first)
    config = (tmp_path / "original-8" / "config.json").read_bytes()
    try:
        # --resume passes train_run's checks and is stopped by the lock; a plain start
        # is refused before, as an existing run.
        again = start(train_args(tiny_data_dir, tmp_path, "--resume", epochs=200))
        fresh = start(train_args(tiny_data_dir, tmp_path, epochs=200))
        (rc_again, err_again), (rc_fresh, err_fresh) = finish(again, 120), finish(fresh, 120)
        assert first.poll() is None, "the first run ended before the test was done"
    finally:
        first.send_signal(signal.SIGINT)       # stop it: a checkpoint, exit 130
        rc, err = finish(first)
    assert rc_again == 1 and one_error_line(err_again), err_again
    assert "in use by another training process" in err_again
    assert rc_fresh == 1 and one_error_line(err_fresh), err_fresh
    assert "already exists" in err_fresh
    assert rc == 128 + signal.SIGINT and "--resume" in err, err
    # The refused processes changed nothing of the run they were refused.
    assert (tmp_path / "original-8" / "config.json").read_bytes() == config
    epochs = list(history.read_run(tmp_path / "histories.h5", "original-8").columns["epoch"])
    assert epochs == list(range(1, len(epochs) + 1)) and epochs
