"""fp16 loss scaling in a whole run: skipped steps, stops and resumes.

A step that loss scaling skips applies nothing (``global_step`` stays), yet the
run moves on to the next batch. These tests force skips all through a run (a
start above the overflow threshold and growth after every 2 good steps, so the scale keeps
climbing back into overflow), stop it at an epoch boundary and in mid-epoch,
resume, and compare every step with an uninterrupted run of the same seed.
"""

import zlib

import numpy as np
import pytest

from resnet_graph import data, graph, history
from resnet_graph import precision as policy
from resnet_graph.config import TrainConfig
from resnet_graph.train import Trainer

QUIET = dict(log=lambda s: None, progress=False)
STEPS_PER_EPOCH = 5


def fp16_config(name):
    # A cosine schedule (a different rate at every step) and augmentation (a
    # different draw at every step): both show a drift by even one step.
    return TrainConfig(model="original", depth=8, epochs=3, batch_size=20, valid_size=50,
                       train_examples=STEPS_PER_EPOCH * 20, lr=0.05, optimizer="momentum",
                       lr_schedule="cosine", warmup_epochs=1, augment=True, precision="fp16",
                       name=name)


@pytest.fixture(scope="module")
def overflowing():
    """Start above the overflow threshold of this tiny model (between 2^16 and 2^18)
    and double after 2 good steps: the scale keeps climbing back into overflow."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(policy, "INITIAL_LOSS_SCALE", 2.0 ** 20)
        mp.setattr(policy, "LOSS_SCALE_GROWTH_STEPS", 2)
        yield


class Recorded(Trainer):
    """Records, for every step run: (epoch, step, steps taken before it, rate, a checksum
    of the augmented batch, skipped-so-far after it, its loss, its accuracy)."""

    def __init__(self, *args, records, crash_before_epoch=None, stop_at=None, **kw):
        super().__init__(*args, **kw)
        self.records = records
        self.crash_before_epoch = crash_before_epoch
        self.stop_at = stop_at
        self.epoch = 0

    def before_epoch(self, epoch):
        if epoch == self.crash_before_epoch:
            raise KeyboardInterrupt("simulated kill after the epoch-boundary checkpoint")
        self.epoch = epoch
        super().before_epoch(epoch)

    def run_step(self, fetches, step):
        t = self.t
        taken = int(self.sess.run(t.steps_taken))
        out = self.sess.run(list(fetches) + [t.images, t.learning_rate, t.step_loss,
                                             t.step_accuracy],
                            {t.batch_index: step, t.training: True})
        *out, images, lr, loss, acc = out
        self.records.append((self.epoch, step, taken, float(lr),
                             zlib.crc32(images.tobytes()), int(self.sess.run(t.skipped_steps)),
                             float(loss), float(acc)))
        return out

    def after_step(self, epoch, step):
        if (epoch, step) == self.stop_at:
            self.request_stop()


def _variables(run_dir):
    """Every checkpointed variable of the latest checkpoint of ``run_dir``."""
    import tensorflow as tf

    from resnet_graph import checkpoint
    reader = tf.compat.v1.train.NewCheckpointReader(checkpoint.latest(run_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.fixture(scope="module")
def dataset(tiny_data_dir):
    return data.load_cifar10(tiny_data_dir, valid_size=50, train_examples=STEPS_PER_EPOCH * 20,
                             seed=0)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory, overflowing):
    """The uninterrupted run that the stopped ones are compared with (trained once)."""
    root = tmp_path_factory.mktemp("straight")
    records, lines = [], []
    # Progress lines (not a terminal under pytest): one after each of steps 1-4 of 5.
    Recorded(fp16_config("straight"), dataset, root / "straight", root / "h.h5",
             records=records, log=lines.append, progress=True).run()
    return (records, _variables(root / "straight"), history.read_run(root / "h.h5", "straight"),
            (root / "straight", lines))


def _compare(straight, records, run_dir, hist, name):
    want_records, want_vars, want_run, _ = straight
    # Same batches, augmentation, rates and positions, step by step.
    assert [r[:5] for r in records] == [r[:5] for r in want_records]
    assert [r[5] for r in records] == [r[5] for r in want_records]
    got = _variables(run_dir)
    # Same number of applied updates and skips.
    assert got["global_step"] == want_vars["global_step"]
    assert got["loss_scaling/skipped_steps"] == want_vars["loss_scaling/skipped_steps"]
    assert got["global_step"] + got["loss_scaling/skipped_steps"] == 3 * STEPS_PER_EPOCH
    for key in got:
        if "moving_" in key:
            assert np.isfinite(got[key]).all(), key
    for key in ("model/stem/conv/kernel", "model/dense/kernel"):
        np.testing.assert_allclose(got[key], want_vars[key], rtol=1e-3, atol=1e-5)
    run = history.read_run(hist, name)
    assert list(run.columns["epoch"]) == [1, 2, 3]
    np.testing.assert_allclose(run.columns["lr"], want_run.columns["lr"], rtol=1e-6)
    np.testing.assert_allclose(run.columns["train_loss"], want_run.columns["train_loss"],
                               rtol=2e-3)


def test_forced_skips_happen_throughout_and_statistics_stay_finite(straight):
    records, variables, *_ = straight
    skipped = [r[5] for r in records]
    increments = np.diff([0] + skipped)
    # Skips in every epoch, and applied steps in every epoch too.
    for epoch in (1, 2, 3):
        per_epoch = [inc for r, inc in zip(records, increments) if r[0] == epoch]
        assert 0 < sum(per_epoch) < STEPS_PER_EPOCH, (epoch, per_epoch, skipped)
    # The position is the count of steps taken, not of updates applied.
    assert [r[2] for r in records] == list(range(3 * STEPS_PER_EPOCH))
    assert variables["global_step"] == 3 * STEPS_PER_EPOCH - skipped[-1]
    for key, value in variables.items():
        if "moving_" in key:
            assert np.isfinite(value).all(), key


def test_the_history_the_progress_lines_and_tensorboard_count_the_skips(straight):
    """Each epoch's skipped steps are the history column ``skipped_steps``, the
    ``epoch/skipped_steps`` event and the progress lines' count; the epoch's training
    loss and accuracy are the means of its applied steps only."""
    from test_tensorboard import read_events
    records, _, run, (run_dir, lines) = straight
    skipped_after = [r[5] for r in records]
    skipped_step = np.diff([0] + skipped_after) > 0
    want_skips, want_loss, want_acc = [], [], []
    for epoch in (1, 2, 3):
        mine = [i for i, r in enumerate(records) if r[0] == epoch]
        applied = [i for i in mine if not skipped_step[i]]
        want_skips.append(len(mine) - len(applied))
        want_loss.append(np.mean([records[i][6] for i in applied]))
        want_acc.append(np.mean([records[i][7] for i in applied]))
    assert all(0 < k < STEPS_PER_EPOCH for k in want_skips), want_skips
    assert list(run.columns["skipped_steps"]) == want_skips
    np.testing.assert_allclose(run.columns["train_loss"], want_loss, rtol=1e-6)
    np.testing.assert_allclose(run.columns["train_acc"], want_acc, rtol=1e-6)
    scalars, _, _ = read_events(run_dir)
    assert [v for _, v in scalars["epoch/skipped_steps"]] == want_skips
    # The progress line after step s of an epoch counts the epoch's skips so far.
    for epoch in (1, 2, 3):
        base = skipped_after[(epoch - 1) * STEPS_PER_EPOCH - 1] if epoch > 1 else 0
        for s in range(1, STEPS_PER_EPOCH):
            line = [x for x in lines if x.startswith(f"epoch {epoch}/3 step {s}/")]
            want = skipped_after[(epoch - 1) * STEPS_PER_EPOCH + s - 1] - base
            assert len(line) == 1 and f" skipped {want} " in line[0], (line, want)


def test_a_run_whose_loss_scale_falls_to_its_floor_stops(dataset, tmp_path, monkeypatch):
    """Scale 2 at the start and lr 1e6: the first step applies (and blows the weights
    up), the second overflows and halves the scale to its floor of 1, and the read at
    the end of epoch 1 stops the run with one error, before the epoch's row."""
    from resnet_graph.errors import UserError
    monkeypatch.setattr(policy, "INITIAL_LOSS_SCALE", 2.0)
    cfg = TrainConfig(model="original", depth=8, epochs=2, batch_size=20, valid_size=50,
                      train_examples=STEPS_PER_EPOCH * 20, lr=1e6, optimizer="momentum",
                      precision="fp16", name="floor")
    with pytest.raises(UserError, match=r"reached its floor \(a scale of 1\) at epoch 1, "
                                        r"step 5, with [1-4] of the epoch's 5 steps skipped"):
        Trainer(cfg, dataset, tmp_path / "floor", tmp_path / "h.h5", **QUIET).run()
    run = history.read_run(tmp_path / "h.h5", "floor")
    assert run.epochs == 0 and run.attrs["status"] == "failed"


def test_resume_at_an_epoch_boundary_after_skips(dataset, tmp_path, straight, overflowing):
    records = []
    cfg = fp16_config("boundary")
    with pytest.raises(KeyboardInterrupt):
        Recorded(cfg, dataset, tmp_path / "boundary", tmp_path / "h.h5", records=records,
                 crash_before_epoch=2, **QUIET).run()
    assert records[-1][5] > 0, "no step was skipped before the stop"
    Recorded(cfg, dataset, tmp_path / "boundary", tmp_path / "h.h5", records=records,
             resume=True, **QUIET).run()
    _compare(straight, records, tmp_path / "boundary", tmp_path / "h.h5", "boundary")


def test_resume_in_mid_epoch_after_skips(dataset, tmp_path, straight, overflowing):
    from resnet_graph.errors import TrainingInterrupted
    records = []
    cfg = fp16_config("middle")
    with pytest.raises(TrainingInterrupted):
        Recorded(cfg, dataset, tmp_path / "middle", tmp_path / "h.h5", records=records,
                 stop_at=(2, 2), **QUIET).run()
    assert len(records) == STEPS_PER_EPOCH + 3
    Recorded(cfg, dataset, tmp_path / "middle", tmp_path / "h.h5", records=records,
             resume=True, **QUIET).run()
    _compare(straight, records, tmp_path / "middle", tmp_path / "h.h5", "middle")


def _applied_then_skipped(dataset, cfg, watched):
    """One applied step (a dark batch), then one skipped step (a bright batch with inf
    activations): asserts that the variables ``watched(tf1)`` picks move on the first
    and are bit-identical after the second."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    g = tf.Graph()
    with g.as_default():
        # std 1e-3: a pixel of 255 normalises to 2.55e5, beyond fp16's 65504, so a
        # bright batch has inf activations and inf/NaN batch statistics.
        t = graph.build_train_graph(cfg, (0.0,) * 3, (1e-3,) * 3, len(dataset.train),
                                    precision="fp16")
        variables = watched(tf1)
        init = tf1.global_variables_initializer()
    assert variables
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: dataset.train.images,
                               t.data_labels: dataset.train.labels})
        # Scale 1: the bright batch below overflows in its activations, not its scale.
        sess.run(t.loss_scale.assign(1.0))
        before = sess.run(variables)
        dark = np.zeros((20, 32, 32, 3), np.uint8)
        sess.run(t.train_op, {t.images: dark, t.training: True})
        assert sess.run([t.global_step, t.skipped_steps]) == [1, 0]
        applied = sess.run(variables)
        assert any(not np.array_equal(a, b) for a, b in zip(before, applied))
        bright = np.full((20, 32, 32, 3), 255, np.uint8)
        # Fetched as the training loop does: the step's own skip is seen with its inf
        # loss, so the loop counts it as a skip, not as a diverged run.
        _, loss, skipped = sess.run([t.train_op, t.step_loss, t.skipped_after_step],
                                    {t.images: bright, t.training: True})
        assert skipped == 1 and not np.isfinite(loss)
        assert sess.run([t.global_step, t.skipped_steps]) == [1, 1]
        for a, b in zip(applied, sess.run(variables)):
            np.testing.assert_array_equal(a, b)


def test_a_skipped_step_leaves_the_batch_norm_statistics_alone(dataset):
    """Statistics move on applied steps only, even when the batch's own are inf."""
    _applied_then_skipped(dataset, fp16_config("bn"), lambda tf1: tf1.get_collection(
        tf1.GraphKeys.MOVING_AVERAGE_VARIABLES, scope="model"))


def test_a_skipped_step_leaves_the_weight_average_alone(dataset):
    """With --ema-decay the shadows move on applied steps only (decay 1 when skipped)."""
    _applied_then_skipped(
        dataset, fp16_config("ema").replace(ema_decay=0.9),
        lambda tf1: [v for v in tf1.global_variables() if v.op.name.endswith(graph.EMA_NAME)])


def test_the_loss_scale_never_grows_past_its_cap(dataset, monkeypatch):
    import tensorflow as tf
    tf1 = tf.compat.v1
    monkeypatch.setattr(policy, "INITIAL_LOSS_SCALE", 2.0 ** 8)
    monkeypatch.setattr(policy, "MAX_LOSS_SCALE", 2.0 ** 9)
    monkeypatch.setattr(policy, "LOSS_SCALE_GROWTH_STEPS", 1)
    g = tf.Graph()
    with g.as_default():
        t = graph.build_train_graph(fp16_config("cap"), dataset.mean, dataset.std,
                                    len(dataset.train), precision="fp16")
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: dataset.train.images,
                               t.data_labels: dataset.train.labels})
        scales = []
        for step in range(3):
            sess.run(t.train_op, {t.batch_index: step, t.training: True})
            scales.append(float(sess.run(t.loss_scale)))
        assert sess.run(t.skipped_steps) == 0
        assert scales == [2.0 ** 9] * 3     # 2^8 doubled once, then held at the cap
