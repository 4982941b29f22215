"""Towers in one process and synchronous training over several processes (loopback only).

Every subprocess runs in its own process group with a timeout and is killed
(group-wide) whatever happens, so no test can hang or leave tasks behind.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from resnet_graph import checkpoint, history
from resnet_graph.cli import cli
from resnet_graph.config import TrainConfig
from resnet_graph.distributed import parse_cluster
from resnet_graph.errors import UserError
from resnet_graph.launch import launch_local, tf_configs
from resnet_graph.replicate import build_replicated_graph as build_train_graph
from resnet_graph.runtime import session_config

tf1 = tf.compat.v1

TRAIN = ["train", "original", "--depth", "8", "--batch-size", "50", "--valid-size", "50",
         "--lr", "0.01", "--seed", "0"]


# -- towers ------------------------------------------------------------------------------
def _one_step(cfg, devices, images, labels, values=None, batch_index=1):
    """Loss and accuracy of one deterministic training step (batch norm on its batch
    statistics) and the variables before and after it (``values`` preset)."""
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, (120,) * 3, (60,) * 3, len(images), devices=devices,
                              precision=cfg.precision)
        init = tf1.global_variables_initializer()
        variables = {v.op.name: v for v in tf1.global_variables()}
    with tf1.Session(graph=g, config=session_config(devices)) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: images, t.data_labels: labels})
        if values is not None:
            for name, value in values.items():
                variables[name].load(value, sess)
        before = sess.run(variables)
        _, loss, acc = sess.run([t.train_op, t.step_loss, t.step_accuracy],
                                {t.batch_index: batch_index, t.training: True})
        after = sess.run(variables)
        devices_used = {op.device for op in g.get_operations() if op.device}
    return loss, acc, before, after, devices_used


# What the tower comparison bounds: the relative norm ||g2 - g1|| / ||g1|| of the
# difference between the two-tower gradient and the mean of the one-device gradients of
# each variable. The towers sum the same products in another order, so the difference
# is rounding, which batch norm over 4 images amplifies: 9.5e-5 (fp32) and 1.0e-4
# (fp16) at worst over the variables, measured on the 2-core AMD EPYC with oneDNN; the
# moving statistics came out bit-identical. A tower that computes on the wrong rows is
# off by about 100% (1.1 measured).
GRADIENT_BOUND = {"fp32": 1e-3, "fp16": 1e-2}


def _tower_gradient_error(precision, corrupt_tower_1=False):
    """One training step on two towers of a global batch of 8 (rows 8:16), against one
    device stepping on each tower's 4 rows alone (rows 8:12, 12:16) from the same
    weights: each tower normalises with its own batch statistics, so the towers'
    gradient is the mean of the two one-device gradients and their loss and accuracy
    the mean of the two; only tower 0's statistics move the moving averages, so those
    equal the one-device step's on rows 8:12. Returns the one-device (mean) loss and
    accuracy, the towers', the largest relative gradient difference over the
    trainable variables (see GRADIENT_BOUND), the largest relative difference of the
    moving statistics and the towers' variables after the step."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 24).astype(np.int32)
    cfg = TrainConfig(depth=8, batch_size=8, optimizer="momentum", lr=0.1, weight_decay=1e-3,
                      augment=False, precision=precision)
    half = cfg.replace(batch_size=4)
    loss_a, acc_a, before, after_a, _ = _one_step(half, 1, images, labels, batch_index=2)
    loss_b, acc_b, _, after_b, _ = _one_step(half, 1, images, labels, values=before,
                                             batch_index=3)
    towers_images = images.copy()
    if corrupt_tower_1:
        # Batch 1 is rows 8:16 of the (identity) order; tower 1 takes rows 12:16.
        towers_images[12:16] = images[0:4]
    loss2, acc2, _, after2, used = _one_step(cfg, 2, towers_images, labels, values=before)
    assert {d for d in used if "CPU:1" in d}, "tower 1 is not on the second device"
    trainable = [n for n in before if n.startswith("model/") and "moving" not in n]
    statistics = [n for n in before if n.startswith("model/") and "moving" in n]
    assert trainable and len(statistics) == 2 * 7   # mean and variance of 7 batch norms
    worst = 0.0
    for name in trainable:
        # momentum SGD's first step: w -= lr * grad, so this compares the gradients.
        g1 = (2 * before[name] - after_a[name] - after_b[name]) / (2 * cfg.lr)
        g2 = (before[name] - after2[name]) / cfg.lr
        worst = max(worst, float(np.linalg.norm(g2 - g1) / np.linalg.norm(g1)))
    moved = 0.0
    for name in statistics:
        assert not np.array_equal(after_a[name], before[name]), name
        moved = max(moved, float(np.linalg.norm(after2[name] - after_a[name])
                                 / np.linalg.norm(after_a[name] - before[name])))
    return (((loss_a + loss_b) / 2, (acc_a + acc_b) / 2), (loss2, acc2), worst, moved,
            after2)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_two_towers_match_one_device(precision):
    (loss1, acc1), (loss2, acc2), worst, moved, after2 = _tower_gradient_error(precision)
    assert worst < GRADIENT_BOUND[precision]
    # The moving statistics' step (not their value, mostly the initial 0 and 1).
    assert moved < GRADIENT_BOUND[precision]
    assert loss2 == pytest.approx(loss1, rel=GRADIENT_BOUND[precision])
    assert acc1 == pytest.approx(acc2, abs=1e-6)
    if precision == "fp16":
        assert after2["loss_scaling/skipped_steps"] == 0


def test_the_tower_comparison_catches_a_tower_on_the_wrong_rows():
    _, _, worst, _, _ = _tower_gradient_error("fp16", corrupt_tower_1=True)
    assert worst > 10 * GRADIENT_BOUND["fp16"]


def test_cluster_json_is_checked():
    spec = {"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]},
            "task": {"type": "worker", "index": 1}}
    c = parse_cluster(json.dumps(spec))
    assert (c.rank, c.workers, c.is_chief, c.leader) == (2, 3, False, "/job:chief/replica:0/task:0")
    with pytest.raises(UserError, match="ps"):
        parse_cluster({"cluster": {"ps": ["h:1"], "worker": ["h:2"]},
                       "task": {"type": "worker", "index": 0}})
    with pytest.raises(UserError, match="not in the cluster"):
        parse_cluster({"cluster": {"worker": ["h:2"]}, "task": {"type": "worker", "index": 3}})


# -- processes -------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("RESNET_GRAPH_DATA_DIR", None)
    return env


def _kill_group(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait(timeout=10)


def _launch(args, timeout, env=None):
    cmd = [sys.executable, "-m", "resnet_graph.cli", "launch-local", "--grace", "10", *args]
    p = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        _kill_group(p)
    return p.returncode, out, err


# A sitecustomize for the tasks of a cluster whose all-reduce leaves the gradients and
# statistics deltas alone: every process still takes part in the step's all-reduce (the
# metrics and the stop flag keep the tasks together) but applies its own gradients.
NO_GRADIENT_ALL_REDUCE = """
import os
if os.environ.get("TF_CONFIG"):
    from resnet_graph import distributed
    import tensorflow as tf
    reduce = distributed.StepReducer.__call__
    def local_only(self, values, metrics):
        _, metrics = reduce(self, values, metrics)
        return [tf.convert_to_tensor(v) for v in values], metrics
    distributed.StepReducer.__call__ = local_only
"""


def _trainable(run_dir):
    """The model's trainable weights (no moving statistics, no optimizer slots) in the
    latest checkpoint of ``run_dir``."""
    reader = tf1.train.NewCheckpointReader(checkpoint.latest(run_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "moving_" not in name and "/Adam" not in name}


def _distance(a, b):
    """The largest difference between two sets of weights, relative to each variable's
    largest entry."""
    assert a.keys() == b.keys() and a
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a)


# Two workers after 5 steps against one process with two towers on the same global
# batches (each worker's rows are a tower's rows; each normalises its own 25 images):
# the same gradients summed in another order. Measured on the 2-core AMD EPYC: 0
# (bit-identical) with the all-reduce, 1.3 without it (each worker applying its own
# gradients).
WORKERS_BOUND = 1e-4


def test_two_workers_train_one_model_that_evaluates_in_one_process(tiny_data_dir, tmp_path):
    start = time.monotonic()
    code, out, err = _launch(["--workers", "2", "--", *TRAIN, "--epochs", "1",
                              "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "w"),
                              "--worker-timeout", "60"], timeout=240)
    assert code == 0, err[-2000:]
    assert "[worker:1] worker:1: epoch 1/1" in err        # the worker logs on stderr
    assert "[worker:0] epoch 1/1" in out                   # the chief on stdout
    run = history.read_run(tmp_path / "w" / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1]
    assert run.attrs["workers"] == 2
    saved = checkpoint.read_config(tmp_path / "w" / "original-8")
    assert saved["workers"] == 2 and saved["batch_size"] == 50
    assert checkpoint.latest(tmp_path / "w" / "original-8").endswith("model.ckpt-5")  # 250 / 50
    # `resnet-graph eval --ckpt` in this (single, cluster-less) process.
    ev = CliRunner().invoke(cli, ["eval", "--ckpt", str(tmp_path / "w" / "original-8"),
                                  "--json"], catch_exceptions=False)
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.output)["accuracy"] == pytest.approx(run.attrs["test_acc"], abs=1e-12)
    # The same 5 steps in this process, on two towers.
    result = CliRunner().invoke(cli, [*TRAIN, "--epochs", "1", "--devices", "2", "--quiet",
                                      "--data-dir", str(tiny_data_dir),
                                      "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    one = _trainable(tmp_path / "one" / "original-8")
    workers = _trainable(tmp_path / "w" / "original-8")
    assert _distance(workers, one) < WORKERS_BOUND
    # The check sees a cluster whose all-reduce does not average the gradients.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_GRADIENT_ALL_REDUCE)
    code, out, err = _launch(["--workers", "2", "--", *TRAIN, "--epochs", "1",
                              "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "local"),
                              "--worker-timeout", "60"], timeout=240,
                             env=dict(_env(), PYTHONPATH=str(site)))
    assert code == 0, err[-2000:]
    local = _trainable(tmp_path / "local" / "original-8")
    print(f"distance to one process: {_distance(workers, one):.1e} with the all-reduce, "
          f"{_distance(local, one):.1e} without; {time.monotonic() - start:.1f}s")
    assert _distance(local, one) > 100 * WORKERS_BOUND


def test_a_killed_worker_stops_the_chief_cleanly_and_the_run_resumes(tiny_data_dir, tmp_path):
    common = [*TRAIN, "--data-dir", str(tiny_data_dir), "--out", str(tmp_path),
              "--worker-timeout", "30"]
    tasks = []
    try:
        for config in tf_configs(2):
            env = dict(_env(), TF_CONFIG=json.dumps(config))
            tasks.append(subprocess.Popen(
                [sys.executable, "-m", "resnet_graph.cli", *common, "--epochs", "30"], env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True))
        chief, worker = tasks
        # Read the chief's lines in a thread: a blocking readline must not hang the test.
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(chief.stdout.readline, "")),
                                  daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        # Epoch 2's summary line (its progress lines, "epoch 2/30 step ...", come earlier).
        while not any(line.startswith("epoch 2/30  train loss") for line in lines):
            assert time.monotonic() < deadline and chief.poll() is None, lines
            time.sleep(0.1)
        os.killpg(worker.pid, signal.SIGKILL)
        killed = time.monotonic()
        code = chief.wait(timeout=30 + 60)        # worker timeout + the watchdog's margin
        waited = time.monotonic() - killed
        err = chief.stderr.read()
    finally:
        for p in tasks:
            _kill_group(p)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: worker:0: lost the other tasks") and "--resume" in last, last
    print(f"chief stopped {waited:.1f}s after the worker was killed")
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    done = int(run.columns["epoch"][-1])
    assert list(run.columns["epoch"]) == list(range(1, done + 1)) and done >= 2
    assert checkpoint.latest(tmp_path / "original-8").endswith(f"model.ckpt-{5 * done}")
    # Recovery: restart every task with --resume; the run continues from the checkpoint.
    code, out, err = _launch(["--workers", "2", "--", *common, "--resume",
                              "--epochs", str(done + 1)], timeout=240)
    assert code == 0, err[-2000:]
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == list(range(1, done + 2))
    assert f"resuming original-8 after epoch {done}" in out


def test_launch_local_stops_the_others_when_a_task_fails(tmp_path):
    """No TensorFlow: a fake interpreter whose task 1 fails while task 0 would run on."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\n"
                    "case \"$TF_CONFIG\" in *'\"index\": 1'*) echo boom >&2; exit 3;; esac\n"
                    "echo started; exec sleep 60\n")
    fake.chmod(0o755)
    start = time.monotonic()
    out, err = _Capture(), _Capture()
    code = launch_local(["train"], 2, grace=2, stdout=out, stderr=err, python=str(fake))
    assert time.monotonic() - start < 20
    assert code == 128 + signal.SIGTERM        # the chief's status: stopped by SIGTERM
    assert "[worker:1] boom" in err.text and "worker:1 exited with status 3" in err.text
    assert "[worker:0] started" in out.text


class _Capture:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


FAKE_TASK = """#!{python}
# Stands in for a training task: on SIGINT it stops as resnet-graph does, the chief
# after 3 s of writing (an epoch's validation, row and checkpoint), the worker at once;
# a second signal while stopping kills it (the default action), as in the trainer.
import os, signal, sys, time
chief = '"index": 0' in os.environ["TF_CONFIG"]
stop = []
def handle(number, frame):
    stop.append(number)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
signal.signal(signal.SIGINT, handle)
signal.signal(signal.SIGTERM, handle)
print("started", flush=True)
while not stop:
    time.sleep(0.05)
if chief:
    time.sleep(3)
print("stopped", flush=True)
sys.exit(128 + stop[0])
"""


def test_ctrl_c_lets_the_chief_finish_its_checkpoint_when_a_worker_stops_first(tmp_path):
    """No TensorFlow: the launcher must not take a worker's stop (130) for a failure and
    SIGTERM the chief while it writes (it would die with 143, its checkpoint half done)."""
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_TASK.format(python=sys.executable))
    fake.chmod(0o755)
    out, err = _Capture(), _Capture()
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        code = launch_local(["train"], 2, grace=10, stdout=out, stderr=err, python=str(fake))
    finally:
        timer.cancel()
    assert code == 128 + signal.SIGINT, err.text
    assert out.text.count("stopped") == 2 and "[worker:0] stopped" in out.text, out.text
    assert "exited with status" not in err.text
