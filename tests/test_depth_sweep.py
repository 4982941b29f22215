"""Issue 25: depth sweeps, gradient flow, layer responses, paired intervals, the figures."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import data, experiment, history, plotting, stats
from resnet_graph.analysis import layer_responses
from resnet_graph.config import TrainConfig
from resnet_graph.graph import attach_model
from resnet_graph.probes import GRAD_NORM
from resnet_graph.train import Trainer

tf1 = tf.compat.v1
SWEEP = ["--models", "plain,original", "--depths", "8,14", "--seeds", "0", "--recipe", "fast",
         "--epochs", "2", "--batch-size", "50", "--valid-size", "50", "--train-examples", "100",
         "--precision", "fp32", "--quiet"]


def _cli(*args):
    return [os.path.join(os.path.dirname(sys.executable), "resnet-graph"), *map(str, args)]


def _wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def _epochs(path, name):
    try:
        if not history.has_run(path, name, guard=False):
            return 0
        return history.read_run(path, name, guard=False).epochs
    except history.HistoryError:   # caught mid-replace: try again
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, tiny_data_dir):
    """The sweep killed (SIGKILL) after the first epoch of plain-14-s0, then run again."""
    out = tmp_path_factory.mktemp("sweep") / "exp"
    args = _cli("experiment", *SWEEP, "--data-dir", tiny_data_dir, "--out", out)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = _wait_for(lambda: _epochs(out / "histories.h5", "plain-14-s0") >= 1, 240, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert reached, "the sweep ended before plain-14-s0 had an epoch"
    before = {n: history.read_run(out / "histories.h5", n) for n in ("plain-8-s0", "original-8-s0")}
    killed_state = experiment.run_state(out, TrainConfig(model="plain", depth=14, epochs=2,
                                                         name="plain-14-s0"))
    done = subprocess.run(args + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, before, killed_state, done.stdout, json.loads(done.stdout.splitlines()[-1])


def test_a_killed_sweep_resumes_without_training_finished_runs_again(killed_and_resumed):
    out, before, killed_state, _, report = killed_and_resumed
    assert killed_state == "partial"
    names = history.run_names(out / "histories.h5")
    assert sorted(names) == ["original-14-s0", "original-8-s0", "plain-14-s0", "plain-8-s0"]
    for name, old in before.items():   # kept bit for bit: same rows, same creation time
        new = history.read_run(out / "histories.h5", name)
        assert new.attrs["created"] == old.attrs["created"]
        assert new.attrs["test_acc"] == old.attrs["test_acc"]
        np.testing.assert_array_equal(new.columns["seconds"], old.columns["seconds"])
    for name in names:
        run = history.read_run(out / "histories.h5", name)
        assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs
        depth = run.attrs["config"]["depth"]
        assert run.matrices[GRAD_NORM].shape == (2, depth)   # 6n+1 convolutions + dense
        assert run.labels[GRAD_NORM][0] == "stem/conv" and run.labels[GRAD_NORM][-1] == "dense"
    assert [r["status"] for r in report["runs"]] == ["finished"] * 4
    assert report["depths"] == [8, 14]


def test_the_sweep_report_has_a_row_per_model_and_depth(killed_and_resumed):
    out, *_, report = killed_and_resumed
    assert set(report["models"]) == {"plain-8", "original-8", "plain-14", "original-14"}
    for key, entry in report["models"].items():
        model, depth = key.split("-")
        run = history.read_run(out / "histories.h5", f"{key}-s0")
        assert entry["model"] == model and entry["depth"] == int(depth)
        assert entry["final_train_loss"]["mean"] == pytest.approx(run.columns["train_loss"][-1])
        assert entry["final_train_acc"]["mean"] == pytest.approx(run.columns["train_acc"][-1])
        assert entry["test_acc"]["mean"] == pytest.approx(run.attrs["test_acc"])
    text = (out / "report.md").read_text()
    assert "# Experiment: fast recipe, depths 8, 14" in text
    for model in ("plain", "original"):
        for depth in (8, 14):
            test_error = 100 * (1 - report["models"][f"{model}-{depth}"]["test_acc"]["mean"])
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| {model} | {depth} | 1/1 |"))
            assert f"{test_error:.2f}" in row
    # One seed: every comparison says so, none gives a bare difference.
    kinds = {(c["kind"], c["a"], c["b"]) for c in report["comparisons"]}
    assert ("model", "plain-8", "original-8") in kinds
    assert ("depth", "plain-8", "plain-14") in kinds
    assert all(c["verdict"] == "one seed: not resolved" and c["low"] is None
               for c in report["comparisons"])
    assert "(one seed: not resolved)" in text
    for figure in ("error.png", "grad_norm.png", "loss.png", "accuracy.png"):
        assert (out / figure).stat().st_size > 0


def test_error_figure_has_a_panel_per_family_and_a_colour_per_depth(killed_and_resumed):
    out = killed_and_resumed[0]
    runs = history.read_history(out / "histories.h5")
    fig = plotting._error_figure(runs)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["plain", "ResNet (original)"]
    for ax in axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["8 layers", "14 layers"]
        lines = [line for line in ax.get_lines() if line.get_linestyle() in ("-", "--")]
        # Per depth: training dashed and thin, validation solid and bold, one colour.
        assert sorted(line.get_linestyle() for line in lines) == ["-", "-", "--", "--"]
        for depth_lines in (lines[:2], lines[2:]):
            assert depth_lines[0].get_color() == depth_lines[1].get_color()
        assert lines[0].get_color() != lines[2].get_color()
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    grads = plotting._grad_norm_figure(runs)
    assert [ax.get_yscale() for ax in grads.axes] == ["log", "log"]
    assert [t.get_text() for t in grads.axes[0].get_legend().get_texts()] == [
        "8 layers, epoch 1", "8 layers, epoch 2", "14 layers, epoch 1", "14 layers, epoch 2"]


def test_seeds_of_one_model_share_a_colour_and_a_legend_entry(killed_and_resumed, tmp_path):
    out = killed_and_resumed[0]
    runs = history.read_history(out / "histories.h5", ["plain-8-s0", "original-8-s0"])
    # A second seed of plain-8: the same history under another seed's name.
    path = tmp_path / "h.h5"
    for run, seed, name in ((runs[0], 0, "plain-8-s0"), (runs[0], 1, "plain-8-s1"),
                            (runs[1], 0, "original-8-s0")):
        history.create_run(path, name, config=dict(run.attrs["config"], seed=seed))
        for i in range(run.epochs):
            history.append_epoch(path, name, {k: v[i] for k, v in run.columns.items()})
    fig = plotting._accuracy_figure(history.read_history(path),
                                    *_colours_and_keys(history.read_history(path)))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "plain-8 train", "plain-8 valid", "original-8 train", "original-8 valid"]
    colours = [line.get_color() for line in ax.get_lines()]
    assert colours[0] == colours[1] == colours[2] == colours[3] != colours[4]
    assert [line.get_linestyle() for line in ax.get_lines()][:2] == ["-", "--"]


def _colours_and_keys(runs):
    keys = plotting._group_keys(runs)
    palette = dict(zip(dict.fromkeys(keys), plotting._colours(len(set(keys)))))
    return [palette[k] for k in keys], keys


# -- gradient flow -------------------------------------------------------------------------
def test_grad_norm_equals_tf_gradients_computed_separately(tiny_data_dir, tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = TrainConfig(model="original", depth=8, epochs=1, batch_size=50, valid_size=50,
                      lr=0.05, optimizer="momentum", label_smoothing=0.1, weight_decay=5e-4,
                      augment=True, precision="fp32")
    Trainer(cfg, ds, tmp_path / "run", tmp_path / "h.h5", log=lambda s: None,
            progress=False).run()
    run = history.read_run(tmp_path / "h.h5", cfg.name)
    recorded, layers = run.matrices[GRAD_NORM][0], run.labels[GRAD_NORM]
    # Separately: a new graph from the epoch's checkpoint, the label-smoothed
    # cross-entropy written out here, tf.gradients of each kernel on the first
    # batch_size training images in training mode.
    g = tf.Graph()
    with g.as_default():
        t = attach_model(cfg, ds.mean, ds.std)
        onehot = tf.one_hot(t.labels, 10)
        targets = onehot * 0.9 + 0.1 / 10
        loss = -tf.reduce_mean(tf.reduce_sum(targets * tf.nn.log_softmax(t.logits), axis=1))
        kernels = {v.op.name: v for v in tf1.trainable_variables() if v.op.name.endswith("kernel")}
        names = [f"model/{layer}/kernel" for layer in layers]
        grads = tf.gradients(loss, [kernels[n] for n in names])
        saver = tf1.train.Saver()
        with tf1.Session(graph=g) as sess:
            saver.restore(sess, tf1.train.latest_checkpoint(str(tmp_path / "run")))
            values = sess.run(grads, {t.images: ds.train.images[:50],
                                      t.labels: ds.train.labels[:50], t.training: True})
    expected = [np.linalg.norm(v) for v in values]
    assert len(layers) == 8 and layers[0] == "stem/conv" and layers[-1] == "dense"
    np.testing.assert_allclose(recorded, expected, rtol=2e-4)
    assert run.columns["grad_norm_seconds"][0] > 0


# -- layer responses -----------------------------------------------------------------------
def _conv(x, k, stride):
    """SAME convolution, NHWC, TensorFlow's padding (more after than before when odd)."""
    n, h, w, _ = x.shape
    kh = k.shape[0]
    out_h = -(-h // stride)
    pad = max((out_h - 1) * stride + kh - h, 0)
    before = pad // 2
    xp = np.pad(x, ((0, 0), (before, pad - before), (before, pad - before), (0, 0)))
    out = np.zeros((n, out_h, out_h, k.shape[3]))
    for i in range(kh):
        for j in range(kh):
            patch = xp[:, i:i + stride * out_h:stride, j:j + stride * out_h:stride, :]
            out += np.tensordot(patch, k[i, j], axes=([3], [0]))
    return out


def _numpy_responses(model, reader, images, mean, std, depth):
    """Every 3x3 convolution's response, by numpy, from the checkpoint's weights."""
    def var(name):
        return reader.get_tensor(f"model/{name}").astype(np.float64)

    def bn(x, scope):
        return ((x - var(f"{scope}/moving_mean")) / np.sqrt(var(f"{scope}/moving_variance") + 1e-5)
                * var(f"{scope}/gamma") + var(f"{scope}/beta"))

    relu = lambda v: np.maximum(v, 0.0)   # noqa: E731
    x = (images.astype(np.float64) - mean) / std
    responses = []
    y = bn(_conv(x, var("stem/conv/kernel"), 1), "stem/bn")
    responses.append(y)
    y = relu(y)
    n = (depth - 2) // 6
    for stage, filters in enumerate((16, 32, 64)):
        for k in range(n):
            s = f"stage{stage + 1}/block{k + 1}"
            stride = 2 if stage > 0 and k == 0 else 1
            short = y[:, ::stride, ::stride, :]
            extra = filters - short.shape[3]
            short = np.pad(short, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
            if model == "preact":
                z = y if (stage, k) == (0, 0) else relu(bn(y, f"{s}/bn1"))
                z = bn(_conv(z, var(f"{s}/conv1/kernel"), stride), f"{s}/bn2")
                responses.append(z)
                z = _conv(relu(z), var(f"{s}/conv2/kernel"), 1)
                responses.append(z)
                y = z + short
                continue
            z = bn(_conv(y, var(f"{s}/conv1/kernel"), stride), f"{s}/bn1")
            responses.append(z)
            z = bn(_conv(relu(z), var(f"{s}/conv2/kernel"), 1), f"{s}/bn2")
            responses.append(z)
            y = relu(z + short) if model == "original" else relu(z)
    return responses


@pytest.mark.parametrize("model", ["original", "preact", "plain"])
def test_responses_equal_a_numpy_forward_pass_from_the_same_weights(model, tiny_data_dir,
                                                                     tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = TrainConfig(model=model, depth=8, epochs=1, batch_size=50, valid_size=50, lr=0.05,
                      optimizer="momentum", precision="fp32")
    Trainer(cfg, ds, tmp_path / "run", tmp_path / "h.h5", log=lambda s: None,
            progress=False).run()
    result = layer_responses(tmp_path / "run", data_dir=tiny_data_dir, batch_size=37)
    saved = json.loads((tmp_path / "run" / "responses.json").read_text())
    assert saved == json.loads(json.dumps(result))
    reader = tf1.train.load_checkpoint(str(tmp_path / "run"))
    expected = _numpy_responses(model, reader, ds.test.images, np.array(ds.mean),
                                np.array(ds.std), 8)
    assert [layer["name"] for layer in result["layers"]] == [
        "stem/conv"] + [f"stage{s}/block1/conv{c}" for s in (1, 2, 3) for c in (1, 2)]
    assert result["examples"] == len(ds.test) and result["precision"] == "fp32"
    np.testing.assert_allclose([layer["std"] for layer in result["layers"]],
                               [r.std() for r in expected], rtol=1e-4)
    np.testing.assert_allclose([layer["mean"] for layer in result["layers"]],
                               [r.mean() for r in expected], rtol=1e-3, atol=1e-4)


def test_responses_figure_draws_layer_order_and_sorted(tmp_path):
    entries = [{"run": "plain-8-s0", "model": "plain", "layers": [{"std": v} for v in (1, 3, 2)]},
               {"run": "original-8-s0", "model": "original",
                "layers": [{"std": v} for v in (0.5, 0.2, 0.9)]}]
    fig = plotting._responses_figure(entries)
    top, bottom = fig.axes
    assert [line.get_linestyle() for line in top.get_lines()] == ["--", "-"]
    np.testing.assert_array_equal(top.get_lines()[0].get_ydata(), [1, 3, 2])
    np.testing.assert_array_equal(bottom.get_lines()[0].get_ydata(), [3, 2, 1])
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["plain-8-s0", "original-8-s0"]


# -- statistics ----------------------------------------------------------------------------
def test_t_quantiles_are_the_tables():
    # Two-sided 95% critical values of Student's t (any statistics table).
    for df, value in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert stats.t_quantile(0.95, df) == pytest.approx(value, abs=5e-4)
    assert stats.t_quantile(0.99, 9) == pytest.approx(3.250, abs=5e-4)


def test_paired_interval_of_students_sleep_data():
    # Student (1908) / Cushny and Peebles: extra hours of sleep of 10 patients under two
    # drugs. The paired t interval of the difference is the textbook 0.700 to 2.460
    # (t = 4.062, 9 degrees of freedom, p = 0.0028).
    drug1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    drug2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    diff = stats.paired_difference(dict(enumerate(drug2)), dict(enumerate(drug1)))
    assert diff.n == 10 and diff.mean == pytest.approx(1.58)
    assert (diff.low, diff.high) == (pytest.approx(0.7001142, abs=1e-6),
                                     pytest.approx(2.4598858, abs=1e-6))
    assert diff.resolved and diff.verdict().startswith("resolved")
    assert stats.t_two_sided_p(4.0621, 9) == pytest.approx(0.002833, abs=2e-6)
    one = stats.paired_difference({0: 0.1}, {0: 0.3, 1: 0.2})
    assert one.n == 1 and one.low is None and one.verdict() == "one seed: not resolved"
    assert stats.paired_difference({0: 0.1}, {1: 0.2}) is None
    # Seeds that changed nothing: the same difference every time, up to float rounding.
    same = stats.paired_difference({0: 0.3, 1: 0.5, 2: 0.7}, {0: 0.1, 1: 0.3, 2: 0.5})
    assert same.n == 3 and same.mean == pytest.approx(0.2) and same.high - same.low < 1e-9
    assert not same.resolved and same.verdict().startswith("no spread over the seeds")


def test_report_comparisons_pair_seeds_and_give_the_interval():
    def row(model, depth, seed, test_acc, train_acc):
        return experiment.RunRow(
            name=f"{model}-{depth}-s{seed}", model=model, depth=depth, seed=seed,
            status="finished", epochs=10, params=1, best_valid_acc=0.5, best_epoch=3,
            final_train_loss=0.5, final_train_acc=train_acc, final_valid_acc=0.5,
            test_acc=test_acc, best_test_acc=test_acc, wall_clock_seconds=1.0,
            images_per_sec=1.0, device="", precision="fp32")
    rows = [row("plain", 20, 0, 0.90, 0.95), row("plain", 20, 1, 0.91, 0.94),
            row("plain", 20, 2, 0.89, 0.93),
            row("original", 20, 0, 0.92, 0.97), row("original", 20, 1, 0.925, 0.96),
            row("original", 20, 2, 0.90, 0.97)]
    compared = experiment.comparisons(rows)
    test = next(c for c in compared if c["metric"] == "test_error")
    assert (test["a"], test["b"], test["n"]) == ("plain-20", "original-20", 3)
    expected = stats.difference_interval([-(0.92 - 0.90), -(0.925 - 0.91), -(0.90 - 0.89)])
    assert test["difference"] == pytest.approx(expected.mean)
    assert (test["low"], test["high"]) == (pytest.approx(expected.low),
                                           pytest.approx(expected.high))
    assert test["resolved"] == (expected.high < 0)
    lines = experiment._comparison_lines(compared)
    row = next(line for line in lines if line.startswith("| plain-20 | original-20 |"))
    assert f"n=3: {'resolved' if test['resolved'] else 'not resolved'}" in row


def test_a_comparison_without_spread_is_not_called_resolved_in_the_report():
    cell = experiment._comparison_cell({"n": 2, "difference": -0.02, "low": -0.02, "high": -0.02})
    assert cell == "-2.00 n=2, no spread over the seeds: not resolved"
