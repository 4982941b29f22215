"""The training loop on tiny synthetic data: learning, checkpoints, resume, history."""

import json

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import checkpoint, data, history, ops
from resnet_graph.config import TrainConfig
from resnet_graph.errors import CheckpointError, UserError
from resnet_graph.evaluate import evaluate_run
from resnet_graph.graph import build_eval_graph, build_train_graph
from resnet_graph.inputs import augment, epoch_order
from resnet_graph.runs import train_run
from resnet_graph.train import Trainer

tf1 = tf.compat.v1


def tiny_config(**kw):
    values = dict(model="original", depth=8, epochs=2, batch_size=50, valid_size=50, lr=0.01)
    values.update(kw)
    return TrainConfig(**values)


def loaded_session(ds, cfg):
    """A session with ``cfg``'s initialised training graph and ``ds.train`` loaded into it."""
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, ds.mean, ds.std, len(ds.train))
        init = tf1.global_variables_initializer()
    sess = tf1.Session(graph=g)
    sess.run(init)
    sess.run(t.load_data, {t.data_images: ds.train.images, t.data_labels: ds.train.labels})
    return sess, t


def test_a_few_steps_cut_the_loss(tiny_data_dir):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    sess, t = loaded_session(ds, tiny_config())
    with sess:
        feed = {t.images: ds.valid.images, t.labels: ds.valid.labels}
        before = sess.run(t.loss, feed)
        for step in range(15):
            sess.run(t.train_op, {t.batch_index: step % 5, t.training: True})
        after = sess.run(t.loss, feed)
        assert sess.run(t.global_step) == 15
    assert after < 0.5 * before


def test_in_graph_batches_follow_the_epoch_order(tiny_data_dir):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = tiny_config()
    order = epoch_order(0, 1, len(ds.train))
    sess, t = loaded_session(ds, cfg)
    with sess:
        sess.run(t.set_permutation, {t.permutation: order})
        images, labels = sess.run([t.images, t.labels], {t.batch_index: 2})
    np.testing.assert_array_equal(images, ds.train.images[order[100:150]])
    np.testing.assert_array_equal(labels, ds.train.labels[order[100:150]])
    # The order is a function of (seed, epoch) only.
    np.testing.assert_array_equal(order, epoch_order(0, 1, len(ds.train)))
    assert not np.array_equal(order, epoch_order(0, 2, len(ds.train)))


def test_augmentation_is_a_padded_crop_or_its_mirror_and_repeatable():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    g = tf.Graph()
    with g.as_default():
        seed = tf1.placeholder(tf.int64, [2])
        out = augment(tf.constant(images), seed)
        with tf1.Session() as sess:
            a = sess.run(out, {seed: [0, 5]})
            b = sess.run(out, {seed: [0, 5]})
            c = sess.run(out, {seed: [0, 6]})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    padded = np.pad(images, [(0, 0), (4, 4), (4, 4), (0, 0)])
    flips = 0
    for i in range(len(images)):
        windows = [padded[i, y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
        plain = any(np.array_equal(a[i], w) for w in windows)
        mirrored = any(np.array_equal(a[i], w[:, ::-1]) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 10 < flips < 54  # about half are flipped


def test_checkpoint_restore_gives_identical_logits(tiny_data_dir, tmp_path):
    cfg = tiny_config(epochs=1)
    out = train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    saved = checkpoint.read_config(out["run_dir"])
    norm = saved["normalization"]
    logits = []
    for _ in range(2):
        g = tf.Graph()
        with g.as_default():
            t = build_eval_graph(cfg, norm["mean"], norm["std"])
            saver = tf1.train.Saver()
        with tf1.Session(graph=g) as sess:
            checkpoint.restore(sess, saver, checkpoint.require_latest(out["run_dir"]))
            logits.append(sess.run(t.logits, {t.images: ds.test.images}))
    np.testing.assert_array_equal(logits[0], logits[1])
    # ... and they are the trained model's: eval reproduces the test accuracy training stored.
    run = history.read_run(out["history"], cfg.name)
    m = evaluate_run(out["run_dir"], split="test", batch_size=33)
    assert m.accuracy == pytest.approx(run.attrs["test_acc"], abs=1e-12)
    assert m.loss == pytest.approx(run.attrs["test_loss"], rel=1e-5)


def test_eval_accuracy_matches_training_for_any_batch_size(tiny_data_dir, tmp_path):
    cfg = tiny_config(epochs=1, model="preact")
    out = train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    run = history.read_run(out["history"], cfg.name)
    for batch_size in (1, 17, 50, 1000):
        m = evaluate_run(out["run_dir"], split="valid", batch_size=batch_size)
        assert m.examples == 50
        assert m.accuracy == pytest.approx(float(run.columns["valid_acc"][-1]), abs=1e-12)
        assert m.loss == pytest.approx(float(run.columns["valid_loss"][-1]), rel=1e-4)


def test_history_and_files_of_a_run(tiny_data_dir, tmp_path):
    cfg = tiny_config(epochs=2)
    out = train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1, 2]
    for field in history.FIELDS:
        assert len(run.columns[field]) == 2
    assert np.all((run.columns["train_acc"] >= 0) & (run.columns["train_acc"] <= 1))
    assert run.attrs["config"]["model"] == "original"
    assert run.attrs["tensorflow_version"] == tf.__version__
    assert run.attrs["device"].startswith(("CPU", "GPU"))
    assert 0 <= run.attrs["test_acc"] <= 1
    saved = json.loads((tmp_path / "original-8" / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == cfg
    assert out["test"].examples == 100


def test_resume_continues_without_gaps_or_duplicates(tiny_data_dir, tmp_path):
    """A run stopped after epoch 2 and resumed to 4 equals an uninterrupted 4-epoch run."""
    straight = train_run(tiny_config(epochs=4, name="straight", augment=True),
                         data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    train_run(tiny_config(epochs=2, name="split", augment=True),
              data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    # A kill between the history row and the checkpoint of epoch 3 leaves an extra row:
    history.append_epoch(tmp_path / "histories.h5", "split",
                         {"epoch": 3, "train_loss": 9.0, "train_acc": 0.0, "valid_loss": 9.0,
                          "valid_acc": 0.0, "lr": 0.01, "seconds": 1.0})
    resumed = train_run(tiny_config(epochs=2, name="split", augment=True),
                        data_dir=tiny_data_dir, out=tmp_path, resume=True, epochs_override=4,
                        quiet=True)
    a = history.read_run(tmp_path / "histories.h5", "straight")
    b = history.read_run(tmp_path / "histories.h5", "split")
    assert list(b.columns["epoch"]) == [1, 2, 3, 4]
    # Same data order, augmentation and initialisation: the same numbers, up to
    # floating-point noise from the thread pool's reduction order.
    for field in ("train_loss", "valid_loss", "valid_acc"):
        np.testing.assert_allclose(b.columns[field], a.columns[field], rtol=2e-3, atol=2e-3)
    assert resumed["test"].accuracy == pytest.approx(straight["test"].accuracy, abs=0.02)
    # After the resume the Saver still keeps three checkpoints, the older ones included.
    assert sorted(p.name for p in (tmp_path / "split").glob("model.ckpt-*.index")) == [
        "model.ckpt-10.index", "model.ckpt-15.index", "model.ckpt-20.index"]
    assert len(list((tmp_path / "split" / "best").glob("model.ckpt-*.index"))) == 1


def test_a_run_name_that_exists_is_refused_without_resume(tiny_data_dir, tmp_path):
    train_run(tiny_config(epochs=1), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    before = (tmp_path / "histories.h5").read_bytes()
    with pytest.raises(UserError, match="already exists"):
        train_run(tiny_config(epochs=1), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    assert (tmp_path / "histories.h5").read_bytes() == before
    with pytest.raises(UserError, match="no run"):
        train_run(tiny_config(epochs=1, name="other"), data_dir=tiny_data_dir, out=tmp_path,
                  resume=True, quiet=True)


def test_a_start_that_lost_the_race_for_its_name_changes_nothing(tiny_data_dir, tmp_path):
    """The second of two starts of one name passed train_run's check, then the first
    finished before the second took the run lock: the check is repeated under it."""
    train_run(tiny_config(epochs=1), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    run_dir = tmp_path / "original-8"
    config = (run_dir / "config.json").read_bytes()
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    late = Trainer(tiny_config(epochs=1, lr=0.5), ds, run_dir, tmp_path / "histories.h5",
                   progress=False, log=lambda s: None)
    with pytest.raises(UserError, match="already exists"):
        late.run()
    assert (run_dir / "config.json").read_bytes() == config


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        evaluate_run(tmp_path)


def test_the_run_folder_is_locked_while_training(tiny_data_dir, tmp_path):
    with checkpoint.run_lock(tmp_path):
        with pytest.raises(CheckpointError, match="in use"):
            with checkpoint.run_lock(tmp_path):
                pass


def test_trainer_refuses_a_batch_larger_than_the_data(tiny_data_dir, tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    with pytest.raises(UserError, match="batch size"):
        Trainer(tiny_config(batch_size=1000), ds, tmp_path / "r", tmp_path / "h.h5")


class PoisonAt(Trainer):
    """A trainer whose weights turn NaN after step 0 of epoch 2 (a diverging run); it
    records the steps it ran."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.steps_run = []

    def after_step(self, epoch, step):
        self.steps_run.append((epoch, step))
        if (epoch, step) == (2, 0):
            kernel = [v for v in self.sess.graph.get_collection("trainable_variables")
                      if v.op.name.endswith("stem/conv/kernel")][0]
            with self.sess.graph.as_default():
                kernel.load(np.full(kernel.shape, np.nan, np.float32), self.sess)


@pytest.mark.parametrize("read_every, message, last_step", [
    # The loss is read after every step: the failing step is named.
    (1, "loss became nan at epoch 2, step 2;", 1),
    # Read every 2 steps: the run stops at the first read after the NaN, naming its window.
    (2, r"loss became nan at epoch 2, one of steps 1-2 \(the loss is checked every 2 steps\)",
     1),
    # The default (20 > 5 steps per epoch): at the latest at the epoch's end, before its row.
    (None, "loss became nan at epoch 2, one of steps 1-5", 4),
])
def test_a_diverging_run_stops_and_is_marked_failed(tiny_data_dir, tmp_path, read_every,
                                                     message, last_step):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    hist = tmp_path / "h.h5"
    trainer = PoisonAt(tiny_config(epochs=3), ds, tmp_path / "run", hist,
                       log=lambda s: None, progress=False)
    if read_every is not None:
        trainer.read_every_steps = read_every
    with pytest.raises(UserError, match=message):
        trainer.run()
    assert trainer.steps_run[-1] == (2, last_step)   # no step after the read that saw it
    run = history.read_run(hist, "original-8")
    assert run.attrs["status"] == "failed" and "epoch 2" in run.attrs["failure"]
    assert run.epochs == 1                      # no garbage row appended
    assert checkpoint.latest(tmp_path / "run").endswith("model.ckpt-5")  # epoch 1's, untouched


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tiny_data_dir, tmp_path,
                                                                    monkeypatch):
    """A full disk during the epoch-2 checkpoint: one clear error, epoch 1's checkpoint
    stays the latest, and --resume redoes epoch 2."""
    real_save = tf1.train.Saver.save
    calls = []

    def save(self, sess, path, *args, **kw):
        calls.append(kw.get("global_step"))
        if kw.get("global_step") == 10:
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        return real_save(self, sess, path, *args, **kw)

    monkeypatch.setattr(tf1.train.Saver, "save", save)
    with pytest.raises(CheckpointError, match=r": no space left on device; the previous "
                       r"checkpoint model.ckpt-5 \(1 epoch done\) is intact: free space, then "
                       r"--resume continues from it"):
        train_run(tiny_config(epochs=2), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    assert checkpoint.latest(tmp_path / "original-8").endswith("model.ckpt-5")
    monkeypatch.setattr(tf1.train.Saver, "save", real_save)
    train_run(tiny_config(epochs=2), data_dir=tiny_data_dir, out=tmp_path, resume=True,
              quiet=True)
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs


# -- issue 17: exponential moving average of the weights ---------------------------------------
def _shadows(graph_or_names):
    return [v for v in graph_or_names if v.op.name.endswith("/ExponentialMovingAverage")]


def test_ema_update_runs_after_the_optimizer_update(tiny_data_dir):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    cfg = tiny_config(ema_decay=0.5, optimizer="momentum", lr=0.1)
    sess, t = loaded_session(ds, cfg)
    with sess, sess.graph.as_default():
        kernel = [v for v in tf1.trainable_variables() if v.op.name == "model/dense/kernel"][0]
        shadow = t.ema.average(kernel)
        assert shadow.op.name == "model/dense/kernel/ExponentialMovingAverage"
        w0, s0 = sess.run([kernel, shadow])
        np.testing.assert_array_equal(s0, w0)          # shadows start at the initial weights
        sess.run(t.train_op, {t.batch_index: 0, t.training: True})
        w1, s1 = sess.run([kernel, shadow])
    assert not np.allclose(w1, w0)
    # decay at step 1: min(0.5, (1 + 1) / (10 + 1)); an average taken before the
    # update would still equal w0.
    d = min(0.5, 2 / 11)
    np.testing.assert_allclose(s1, d * w0 + (1 - d) * w1, rtol=1e-5, atol=1e-7)


def test_ema_covers_weights_and_batch_norm_statistics(tiny_data_dir):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    g = tf.Graph()
    with g.as_default():
        build_train_graph(tiny_config(ema_decay=0.9), ds.mean, ds.std, len(ds.train))
        model = tf1.trainable_variables("model") + [
            v for v in tf1.global_variables("model") if v.op.name.endswith(
                ("/moving_mean", "/moving_variance"))]
        shadows = {v.op.name for v in _shadows(tf1.global_variables())}
        # Nothing may move the shadows but the train op: no batch-norm update of the
        # averaged copy is left in UPDATE_OPS, nor pending.
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        pending = tf1.get_collection(ops.STATISTICS_UPDATES)
    assert shadows == {f"{v.op.name}/ExponentialMovingAverage" for v in model}
    assert any("moving_mean" in n for n in shadows) and len(updates) == 2 * 7
    assert not any(u.name.startswith("averaged/") for u in updates + pending)


def _ema_run(tiny_data_dir, out, **kw):
    # fp32: the manual evaluations below build fp32 graphs (auto may train in bf16).
    cfg = tiny_config(ema_decay=0.9, optimizer="momentum", lr=0.05, precision="fp32", **kw)
    return cfg, train_run(cfg, data_dir=tiny_data_dir, out=out, quiet=True)


def _eval_with(run_dir, cfg, images, labels, averaged: bool, best: bool = False):
    """Loss of the checkpoint restored by hand: raw variables or their shadows."""
    saved = checkpoint.read_config(run_dir)
    norm = saved["normalization"]
    g = tf.Graph()
    with g.as_default():
        t = build_eval_graph(cfg, norm["mean"], norm["std"])
        variables = tf1.global_variables()
        names = {f"{v.op.name}/ExponentialMovingAverage" if averaged else v.op.name: v
                 for v in variables}
        saver = tf1.train.Saver(names)
    with tf1.Session(graph=g) as sess:
        checkpoint.restore(sess, saver, checkpoint.require_latest(run_dir, best=best))
        return sess.run([t.loss, t.accuracy], {t.images: images, t.labels: labels})


def test_an_ema_run_evaluates_its_averaged_weights(tiny_data_dir, tmp_path):
    cfg, out = _ema_run(tiny_data_dir, tmp_path, epochs=3)
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    run = history.read_run(out["history"], cfg.name)
    raw_loss, _ = _eval_with(out["run_dir"], cfg, ds.test.images, ds.test.labels, False)
    ema_loss, ema_acc = _eval_with(out["run_dir"], cfg, ds.test.images, ds.test.labels, True)
    assert abs(raw_loss - ema_loss) > 1e-3                  # the two weight sets differ
    # Training's test metrics, eval --ckpt and the shadows restored by hand agree.
    m = evaluate_run(out["run_dir"], split="test")
    assert m.loss == pytest.approx(ema_loss, rel=1e-5)
    assert m.loss == pytest.approx(run.attrs["test_loss"], rel=1e-5)
    assert m.accuracy == pytest.approx(ema_acc, abs=1e-6)
    assert m.accuracy == pytest.approx(run.attrs["test_acc"], abs=1e-12)
    # So does the validation of each epoch (the last one checked).
    valid = evaluate_run(out["run_dir"], split="valid")
    assert valid.loss == pytest.approx(float(run.columns["valid_loss"][-1]), rel=1e-5)
    assert valid.accuracy == pytest.approx(float(run.columns["valid_acc"][-1]))
    # ... and the best-validation checkpoint.
    best_loss, _ = _eval_with(out["run_dir"], cfg, ds.test.images, ds.test.labels, True,
                              best=True)
    best = evaluate_run(out["run_dir"], split="test", best=True)
    assert best.loss == pytest.approx(best_loss, rel=1e-5)
    assert best.accuracy == pytest.approx(run.attrs["best_test_acc"])
    # The variables eval restores are the checkpoint's shadows.
    from resnet_graph.evaluate import open_run
    reader = tf.train.load_checkpoint(checkpoint.require_latest(out["run_dir"]))
    with open_run(out["run_dir"]) as (sess, _, _):
        for v in sess.graph.get_collection("variables"):
            np.testing.assert_array_equal(
                sess.run(v), reader.get_tensor(f"{v.op.name}/ExponentialMovingAverage"))


def test_resume_restores_the_ema_shadows(tiny_data_dir, tmp_path):
    straight_cfg, straight = _ema_run(tiny_data_dir, tmp_path, epochs=4, name="straight")
    split_cfg, _ = _ema_run(tiny_data_dir, tmp_path, epochs=2, name="split")
    prefix = checkpoint.require_latest(tmp_path / "split")
    reader = tf.train.load_checkpoint(prefix)
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    trainer = Trainer(split_cfg, ds, tmp_path / "split", tmp_path / "histories.h5",
                      resume=True, progress=False, log=lambda s: None)
    trainer.before_train()
    with trainer.sess.graph.as_default():
        shadows = _shadows(tf1.global_variables())
        values = trainer.sess.run(shadows)
        raw = trainer.sess.run([trainer.t.ema.average(v) for v in
                                tf1.trainable_variables("model")][:1] +
                               tf1.trainable_variables("model")[:1])
    trainer.sess.close()
    assert shadows and all(np.array_equal(v, reader.get_tensor(s.op.name))
                           for s, v in zip(shadows, values))
    assert not np.array_equal(raw[0], raw[1])   # restored shadows, not fresh copies
    resumed = train_run(split_cfg, data_dir=tiny_data_dir, out=tmp_path, resume=True,
                        epochs_override=4, quiet=True)
    a = history.read_run(tmp_path / "histories.h5", "straight")
    b = history.read_run(tmp_path / "histories.h5", "split")
    for field in ("train_loss", "valid_loss", "valid_acc"):
        np.testing.assert_allclose(b.columns[field], a.columns[field], rtol=2e-3, atol=2e-3)
    assert resumed["test"].loss == pytest.approx(straight["test"].loss, rel=5e-3)


def test_config_json_records_the_new_options(tiny_data_dir, tmp_path):
    cfg = tiny_config(epochs=1, init="he", stride_padding="symmetric", zero_init_residual=True,
                      ema_decay=0.9)
    out = train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    saved = json.loads((tmp_path / "original-8" / "config.json").read_text())
    assert (saved["init"], saved["stride_padding"], saved["zero_init_residual"],
            saved["ema_decay"]) == ("he", "symmetric", True, 0.9)
    assert TrainConfig.from_dict(saved) == cfg
    assert evaluate_run(out["run_dir"]).accuracy == pytest.approx(out["test"].accuracy)


def test_an_old_config_json_evaluates_as_it_was_trained(tiny_data_dir, tmp_path):
    """A run folder written before issue 17 has none of its keys: it means glorot, same,
    no zero-init and no EMA, and evaluates to what training recorded."""
    out = train_run(tiny_config(epochs=1), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    path = tmp_path / "original-8" / "config.json"
    saved = json.loads(path.read_text())
    for key in ("init", "stride_padding", "zero_init_residual", "ema_decay"):
        del saved[key]
    path.write_text(json.dumps(saved))
    old = TrainConfig.from_dict(saved)
    assert (old.init, old.stride_padding, old.zero_init_residual, old.ema_decay) == (
        "glorot", "same", False, 0.0)
    run = history.read_run(out["history"], "original-8")
    m = evaluate_run(out["run_dir"])
    assert m.accuracy == pytest.approx(run.attrs["test_acc"], abs=1e-12)
    assert m.loss == pytest.approx(run.attrs["test_loss"], rel=1e-5)
