"""Recipes and what they need: the cosine schedule, label smoothing, Nesterov, the best checkpoint."""

import math
import types

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import checkpoint, data, history
from resnet_graph.config import RECIPES, TrainConfig, make_config
from resnet_graph.errors import CheckpointError
from resnet_graph.evaluate import evaluate_run
from resnet_graph.graph import build_train_graph, cosine_with_warmup, learning_rate, training_loss
from resnet_graph.runs import train_run
from resnet_graph.train import Trainer

tf1 = tf.compat.v1


def schedule(cfg, steps_per_epoch, steps):
    """The learning rate of each step in ``steps`` under ``cfg``."""
    g = tf.Graph()
    with g.as_default():
        step = tf1.placeholder(tf.int64, [])
        lr = learning_rate(cfg, step, steps_per_epoch)
        with tf1.Session(graph=g) as sess:
            return [float(sess.run(lr, {step: s})) for s in steps]


def test_cosine_schedule_warms_up_then_falls_to_zero():
    cfg = TrainConfig(lr=0.2, epochs=10, lr_schedule="cosine", warmup_epochs=2)
    # 5 steps per epoch: 10 warm-up steps, 40 cosine steps, 50 in all.
    lrs = schedule(cfg, 5, range(50))
    np.testing.assert_allclose(lrs[:10], [0.2 * (s + 1) / 10 for s in range(10)], rtol=1e-6)
    expected = [0.1 * (1 + math.cos(math.pi * (s - 10) / 40)) for s in range(10, 50)]
    np.testing.assert_allclose(lrs[10:], expected, rtol=1e-5, atol=1e-7)
    assert lrs[9] == pytest.approx(0.2) and lrs[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert schedule(cfg, 5, [50, 80]) == [0.0, 0.0]  # past the end: stays at 0
    # A warm-up longer than the run is cut to the run: the last step is at the peak.
    short = cfg.replace(epochs=1)
    assert schedule(short, 5, [0, 4]) == pytest.approx([0.04, 0.2])


def test_a_step_boundary_is_the_first_step_at_the_new_rate():
    # He et al.: "divide it by 10 at 32k and 48k iterations"; Caffe's multistep rule
    # trains iterations 0..31999 at 0.1 and 32000 at 0.01.
    cfg = TrainConfig(lr=0.1, lr_schedule="step", lr_boundaries=(3, 6), lr_decay=0.1)
    assert schedule(cfg, 5, range(8)) == pytest.approx(
        [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001])
    he = make_config("original", "he2016")
    assert schedule(he, 351, [31999, 32000, 47999, 48000]) == pytest.approx(
        [0.1, 0.01, 0.01, 0.001])


def test_a_fractional_warm_up_never_passes_the_peak():
    cfg = TrainConfig(lr=0.2, epochs=4, lr_schedule="cosine", warmup_epochs=0.5)
    lrs = schedule(cfg, 7, range(5))           # 3.5 warm-up steps
    assert max(lrs) <= np.float32(0.2) and lrs[3] == pytest.approx(0.2)   # old: 0.2 * 4 / 3.5
    assert lrs[:3] == pytest.approx([0.2 * (s + 1) / 3.5 for s in range(3)])


def test_cosine_without_warmup_starts_at_the_peak():
    cfg = TrainConfig(lr=0.1, epochs=4, lr_schedule="cosine")
    assert schedule(cfg, 10, [0, 20]) == pytest.approx([0.1, 0.05], rel=1e-5)
    g = tf.Graph()
    with g.as_default(), tf1.Session() as sess:
        assert sess.run(cosine_with_warmup(1.0, tf.constant(5), 10, 0)) == pytest.approx(0.5)


def test_the_recipes_keep_the_specified_values():
    seed, he, fast = (make_config("original", name) for name in ("seed", "he2016", "fast"))
    assert (seed.optimizer, seed.lr, seed.epochs, seed.batch_size, seed.augment,
            seed.weight_decay, seed.label_smoothing, seed.lr_schedule) == (
        "adam", 0.005, 50, 100, False, 0.0, 0.0, "constant")
    assert (he.optimizer, he.nesterov, he.lr, he.lr_boundaries, he.epochs, he.batch_size,
            he.weight_decay, he.label_smoothing) == (
        "momentum", False, 0.1, (32000, 48000), 182, 128, 1e-4, 0.0)
    assert (fast.optimizer, fast.nesterov, fast.lr, fast.lr_schedule, fast.label_smoothing,
            fast.augment) == ("momentum", True, 0.2, "cosine", 0.1, True)
    assert set(RECIPES) == {"seed", "he2016", "fast"}
    blocks = ("init", "stride_padding", "zero_init_residual", "ema_decay")
    assert [getattr(seed, k) for k in blocks] == ["glorot", "same", False, 0.0]
    assert [getattr(he, k) for k in blocks] == ["he", "symmetric", False, 0.0]
    assert [getattr(fast, k) for k in blocks] == ["glorot", "same", False, 0.0]
    assert he.valid_size == 5000   # the paper trained on all 50,000 (--valid-size 0)
    # An explicit option wins over the recipe.
    assert make_config("plain", "fast", epochs=3, label_smoothing=None).epochs == 3


@pytest.mark.parametrize("bad", [dict(label_smoothing=1.0), dict(label_smoothing=-0.1),
                                 dict(warmup_epochs=-1), dict(lr_schedule="linear"),
                                 dict(init="xavier"), dict(stride_padding="valid"),
                                 dict(ema_decay=1.0), dict(ema_decay=-0.5),
                                 dict(model="plain", zero_init_residual=True)])
def test_bad_recipe_options_are_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_label_smoothing_changes_the_minimised_loss_only():
    logits = np.array([[4.0, 0.0, -1.0] + [0.0] * 7, [0.5, 3.0, 0.0] + [0.0] * 7], np.float32)
    labels = np.array([0, 2], np.int32)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    targets = np.full_like(log_p, 0.02)
    targets[np.arange(2), labels] += 0.8
    g = tf.Graph()
    with g.as_default(), tf1.Session(graph=g) as sess:
        t = types.SimpleNamespace(logits=tf.constant(logits), labels=tf.constant(labels))
        t.loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=t.labels, logits=t.logits))
        smoothed = sess.run(training_loss(TrainConfig(label_smoothing=0.2), t))
        plain = sess.run(training_loss(TrainConfig(), t))
    assert smoothed == pytest.approx(float(np.mean(-np.sum(targets * log_p, 1))), rel=1e-5)
    assert plain == pytest.approx(float(np.mean(-log_p[np.arange(2), labels])), rel=1e-5)
    assert smoothed > plain + 0.1


def test_total_loss_is_the_smoothed_loss_plus_decay(tiny_data_dir):
    """total_loss = smoothed loss + wd * sum(||k||^2) / 2 over the convolution and dense
    kernels, and over nothing else: the decay term's value, and its gradient (wd * k for
    a kernel, none for a bias or a batch-norm scale or offset)."""
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    wd = 0.01
    cfg = TrainConfig(model="original", depth=8, batch_size=50, valid_size=50,
                      label_smoothing=0.2, weight_decay=wd)
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, ds.mean, ds.std, len(ds.train))
        smoothed_t = g.get_tensor_by_name("smoothed_loss:0")
        variables = tf1.trainable_variables("model")
        grads = tf.gradients(t.total_loss - smoothed_t, variables)
        init = tf1.global_variables_initializer()
        with tf1.Session(graph=g) as sess:
            sess.run(init)
            sess.run(t.load_data, {t.data_images: ds.train.images, t.data_labels: ds.train.labels})
            total, smoothed, values, decay_grads = sess.run(
                [t.total_loss, smoothed_t, variables, grads])
    names = [v.op.name for v in variables]
    kernels = [n for n in names if n.endswith("/kernel")]
    # depth 8: the stem, 2 convolutions in each of 3 stages, and the dense layer.
    assert len(kernels) == 8 and "model/dense/kernel" in kernels
    assert any(n.endswith("/gamma") for n in names) and "model/dense/bias" in names
    want = wd * sum(0.5 * float(np.sum(np.square(v, dtype=np.float64)))
                    for n, v in zip(names, values) if n in kernels)
    assert want > 1e-3    # not negligible next to float32 rounding of the total
    assert total - smoothed == pytest.approx(want, rel=1e-4)
    for name, value, grad in zip(names, values, decay_grads):
        if name in kernels:
            np.testing.assert_allclose(grad, wd * value, rtol=1e-4, atol=1e-9, err_msg=name)
        else:   # the smoothed loss's own gradient cancels: what is left is the decay's
            assert grad is None or np.abs(grad).max() < 1e-6, name


def test_nesterov_reaches_the_optimizer(tiny_data_dir):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    g = tf.Graph()
    with g.as_default():
        build_train_graph(TrainConfig(depth=8, batch_size=50, optimizer="momentum", nesterov=True),
                          ds.mean, ds.std, len(ds.train))
        kinds = {op.get_attr("use_nesterov") for op in g.get_operations()
                 if op.type == "ApplyMomentum" or op.type == "ResourceApplyMomentum"}
    assert kinds == {True}


def fast_tiny(**kw):
    values = dict(depth=8, epochs=4, batch_size=50, valid_size=50, lr=0.05,
                  name="best-run")
    values.update(kw)
    return make_config("original", "fast", **values)


def test_best_checkpoint_is_the_best_validation_epoch(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    train_run(fast_tiny(), data_dir=tiny_data_dir, out=out, quiet=True)
    run = history.read_run(out / "histories.h5", "best-run")
    accs = run.columns["valid_acc"]
    best_epoch = int(run.columns["epoch"][int(np.argmax(accs))])
    info = checkpoint.read_best(out / "best-run")
    assert info["epoch"] == best_epoch == run.attrs["best_epoch"]
    assert info["valid_acc"] == pytest.approx(float(np.max(accs)))
    assert checkpoint.latest(out / "best-run" / "best").endswith(f"model.ckpt-{best_epoch}")
    # eval --best reproduces the best validation accuracy and the recorded test accuracy.
    valid = evaluate_run(out / "best-run", split="valid", best=True)
    assert valid.accuracy == pytest.approx(info["valid_acc"])
    test = evaluate_run(out / "best-run", split="test", best=True)
    assert test.accuracy == pytest.approx(run.attrs["best_test_acc"])
    latest = evaluate_run(out / "best-run", split="test")
    assert latest.accuracy == pytest.approx(run.attrs["test_acc"])


def test_resume_remembers_the_best_epoch(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    train_run(fast_tiny(epochs=2), data_dir=tiny_data_dir, out=out, quiet=True)
    first = checkpoint.read_best(out / "best-run")
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    trainer = Trainer(fast_tiny(epochs=2), ds, out / "best-run", out / "histories.h5",
                      resume=True, progress=False, log=lambda s: None)
    trainer.before_train()
    trainer.sess.close()
    assert (trainer.best_epoch, trainer.best_acc) == (first["epoch"], pytest.approx(first["valid_acc"]))


def test_no_validation_split_means_no_best_checkpoint(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    train_run(fast_tiny(epochs=1, valid_size=0), data_dir=tiny_data_dir, out=out, quiet=True)
    assert checkpoint.read_best(out / "best-run") is None
    assert "best_epoch" not in history.read_run(out / "histories.h5", "best-run").attrs
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        evaluate_run(out / "best-run", best=True)
