"""TensorBoard events: every run writes the documented tags into its folder, and
TensorBoard itself (the README's `tensorboard --logdir ...`) serves them."""

import glob
import json
import os
import pathlib
import re
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import data, history
from resnet_graph.config import TrainConfig
from resnet_graph.graph import cosine_rate
from resnet_graph.summaries import RunSummaries
from resnet_graph.train import Trainer

tf1 = tf.compat.v1

FIELDS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "images_per_sec")
STEPS = [5, 10, 15]   # 250 training images / 50 per step, 3 epochs


def read_events(folder):
    files = glob.glob(str(folder / "events.out.tfevents.*"))
    assert len(files) == 1, files
    scalars, histograms, graph = {}, {}, False
    for event in tf1.train.summary_iterator(files[0]):
        graph = graph or bool(event.graph_def)
        assert not event.meta_graph_def   # the graph once, as a GraphDef only
        for value in event.summary.value:
            if value.HasField("histo"):
                histograms.setdefault(value.tag, []).append(event.step)
            else:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, histograms, graph


class EveryFewSteps(Trainer):
    summary_steps = 3

    def make_summaries(self):
        summaries = super().make_summaries()
        summaries.histogram_every = 3
        return summaries


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, tmp_path_factory):
    """A 3-epoch depth-8 run: its folder and its history."""
    tmp = tmp_path_factory.mktemp("tb")
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = TrainConfig(model="preact", depth=8, epochs=3, batch_size=50, valid_size=50, lr=0.01)
    EveryFewSteps(cfg, ds, tmp / "run", tmp / "h.h5", log=lambda s: None, progress=False).run()
    return tmp / "run", history.read_run(tmp / "h.h5", "preact-8")


def test_events_hold_epochs_steps_weights_and_gradients(tiny_run):
    folder, run = tiny_run
    scalars, histograms, graph = read_events(folder)
    assert graph
    for field in FIELDS:
        points = scalars[f"epoch/{field}"]
        assert [s for s, _ in points] == STEPS
        np.testing.assert_allclose([v for _, v in points], run.columns[field], rtol=1e-5)
    assert [s for s, _ in scalars["step/loss"]] == [3, 6, 9, 12, 15]
    # After epoch 1 and every histogram_every (here 3) epochs, not after epoch 2.
    assert histograms["weights/stem/conv/kernel"] == [5, 15]
    assert histograms["weights/dense/kernel"] == [5, 15]
    # The gradient norms are the history's grad_norm (the probe's), layer by layer.
    layers, norms = run.labels["grad_norm"], run.matrices["grad_norm"]
    assert len(layers) == 8 and layers[-1] == "dense"
    for i, layer in enumerate(layers):
        points = scalars[f"grad_norm/{layer}"]
        assert [s for s, _ in points] == STEPS
        np.testing.assert_allclose([v for _, v in points], norms[:, i], rtol=1e-6)
    assert [s for s, _ in scalars["grad_norm/global"]] == STEPS
    np.testing.assert_allclose([v for _, v in scalars["grad_norm/global"]],
                               np.sqrt((norms ** 2).sum(axis=1)), rtol=1e-5)
    assert (norms > 0).all()
    convs = [t for t in histograms if t.startswith("weights/") and t.endswith("/kernel")]
    assert len(convs) == 8   # 7 convolutions + the dense layer at depth 8


# -- TensorBoard itself -------------------------------------------------------------------
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback only


def get(port, path, **query):
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with NO_PROXY.open(url, timeout=10) as response:
        return response.read().decode()


def wait_for_port(proc, deadline):
    """TensorBoard's own line 'TensorBoard X at http://127.0.0.1:PORT/' (it picks PORT
    with --port 0, so no other process can take it between a probe and the start)."""
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen += line
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
    raise AssertionError(f"TensorBoard did not start (exit code {proc.poll()}): {seen[-2000:]}")


def test_tensorboard_serves_the_runs_epoch_scalars_and_graph(tiny_run):
    folder, run = tiny_run
    exe = pathlib.Path(sys.executable).with_name("tensorboard")
    assert exe.is_file(), "tensorboard is not installed in this environment (setup.py installs it)"
    proc = subprocess.Popen([str(exe), "--logdir", str(folder), "--host", "127.0.0.1",
                             "--port", "0", "--reload_interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        port = wait_for_port(proc, deadline)
        while True:   # the first load of the folder runs in the background
            tags = json.loads(get(port, "/data/plugin/scalars/tags")).get(".", {})
            if all(f"epoch/{field}" in tags for field in FIELDS) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for field in FIELDS:
            points = json.loads(get(port, "/data/plugin/scalars/scalars", run=".",
                                    tag=f"epoch/{field}"))
            assert [step for _, step, _ in points] == STEPS, field
            np.testing.assert_allclose([value for _, _, value in points], run.columns[field],
                                       rtol=1e-5, err_msg=field)
        graph = get(port, "/data/plugin/graphs/graph", run=".", conceptual="false")
        assert 'name: "model/stem/conv/kernel"' in graph
        assert 'name: "model/dense/kernel"' in graph
    finally:
        # TensorBoard and the data server it starts: the session this test created.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()


def test_step_losses_reach_the_file_within_a_long_epoch(tmp_path):
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="c")
    summaries = RunSummaries(tmp_path, every_steps=50)
    summaries.open(graph)
    assert not list(tmp_path.iterdir())        # nothing before the first step
    summaries.step(1, 2.5)                     # creates the file: version and graph
    summaries.flush_seconds = 0                # as if 30 s had passed since
    summaries.step(50, 1.5)
    records = list(tf1.train.summary_iterator(str(summaries.path)))   # read while open
    assert [(e.step, v.simple_value) for e in records for v in e.summary.value] == [(50, 1.5)]
    assert any(e.graph_def for e in records)
    summaries.close()


class Recording(Trainer):
    """A TensorBoard point at each epoch's last step; records what each step fetches."""
    summary_steps = 5   # 250 training images / 50 per step

    def run_step(self, fetches, step):
        self.fetched = getattr(self, "fetched", []) + [tuple(f.name for f in fetches)]
        return super().run_step(fetches, step)


def test_every_step_fetches_the_same_and_points_and_rates_are_read_between_steps(
        tiny_data_dir, tmp_path):
    """Each new combination of fetches costs a session a new executor (1-2 s for ResNet-32),
    so every step fetches the train op alone; the step/loss points are means of the steps
    since the previous point (here, whole epochs: the history's train_loss) and the lr
    column is the rate of each epoch's last step, both read between steps."""
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = TrainConfig(model="original", depth=8, epochs=3, batch_size=50, valid_size=50,
                      lr=0.05, lr_schedule="cosine", warmup_epochs=1)
    trainer = Recording(cfg, ds, tmp_path / "run", tmp_path / "h.h5", log=lambda s: None,
                        progress=False)
    trainer.run()
    assert len(trainer.fetched) == 15 and set(trainer.fetched) == {("train_op",)}
    run = history.read_run(tmp_path / "h.h5", "original-8")
    scalars, _, _ = read_events(tmp_path / "run")
    assert [s for s, _ in scalars["step/loss"]] == STEPS
    np.testing.assert_allclose([v for _, v in scalars["step/loss"]], run.columns["train_loss"],
                               rtol=1e-5)
    rates = [cosine_rate(cfg, step - 1, 5) for step in STEPS]   # steps 4, 9, 14 (0-based)
    assert rates[0] == pytest.approx(0.05) and rates[2] < rates[1] < rates[0]
    np.testing.assert_allclose(run.columns["lr"], rates, rtol=1e-5)   # float32 schedule
