"""Ctrl-C / SIGTERM: stop after the current step, checkpoint, resume where it stopped."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from resnet_graph import checkpoint, data, history
from resnet_graph.config import TrainConfig
from resnet_graph.errors import TrainingInterrupted, UserError
from resnet_graph.runs import train_run
from resnet_graph.train import Trainer


def tiny_config(**kw):
    values = dict(model="original", depth=8, epochs=3, batch_size=50, valid_size=50, lr=0.01,
                  augment=True)
    values.update(kw)
    return TrainConfig(**values)


class StopAt(Trainer):
    """A trainer that asks to stop after step ``step`` of epoch ``epoch`` (as Ctrl-C would)."""

    def __init__(self, *args, stop_at=(2, 1), **kw):
        super().__init__(*args, **kw)
        self.stop_at = stop_at

    def after_step(self, epoch, step):
        if (epoch, step) == self.stop_at:
            self.request_stop(signal.SIGINT)


def test_a_stop_mid_epoch_resumes_at_the_same_step(tiny_data_dir, tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    hist = tmp_path / "h.h5"
    quiet = dict(log=lambda s: None, progress=False)
    Trainer(tiny_config(name="straight"), ds, tmp_path / "straight", hist, **quiet).run()
    cfg = tiny_config(name="stopped")
    with pytest.raises(TrainingInterrupted, match="step 2 of epoch 2.*--resume") as info:
        StopAt(cfg, ds, tmp_path / "stopped", hist, stop_at=(2, 1), **quiet).run()
    assert info.value.signal_number == signal.SIGINT
    # The stop wrote a checkpoint at global step 5 + 2 and kept epoch 1's row only.
    assert checkpoint.latest(tmp_path / "stopped").endswith("model.ckpt-7")
    assert history.read_run(hist, "stopped").epochs == 1
    logged = []
    Trainer(cfg, ds, tmp_path / "stopped", hist, resume=True, log=logged.append,
            progress=False).run()
    assert logged[1].startswith(f"resuming stopped at step 2 of epoch 2 from "
                                f"{tmp_path / 'stopped' / 'model.ckpt-7'}; ")
    a, b = history.read_run(hist, "straight"), history.read_run(hist, "stopped")
    assert list(b.columns["epoch"]) == [1, 2, 3]
    # The same steps on the same batches: the epoch metrics, including epoch 2's
    # train loss summed across the stop, agree up to floating-point noise.
    for field in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        np.testing.assert_allclose(b.columns[field], a.columns[field], rtol=2e-3, atol=2e-3)
    assert b.attrs["test_acc"] == pytest.approx(a.attrs["test_acc"], abs=0.02)


def test_a_stop_in_the_last_step_of_an_epoch_finishes_the_epoch_first(tiny_data_dir, tmp_path):
    # 250 training images in batches of 50: 5 steps per epoch, step index 4 is the last.
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    hist = tmp_path / "h.h5"
    quiet = dict(log=lambda s: None, progress=False)
    cfg = tiny_config(name="edge")
    with pytest.raises(TrainingInterrupted, match="step 5 of epoch 2.*model.ckpt-10.*--resume"):
        StopAt(cfg, ds, tmp_path / "edge", hist, stop_at=(2, 4), **quiet).run()
    # Epoch 2 is complete: its row (validated, with the rate of its last step) and the
    # epoch-boundary checkpoint, from which the resumed run starts epoch 3.
    run = history.read_run(hist, "edge")
    assert list(run.columns["epoch"]) == [1, 2] and np.isfinite(run.columns["lr"]).all()
    assert np.isfinite(run.columns["valid_acc"]).all()
    assert checkpoint.latest(tmp_path / "edge").endswith("model.ckpt-10")
    Trainer(cfg, ds, tmp_path / "edge", hist, resume=True, **quiet).run()
    run = history.read_run(hist, "edge")
    assert list(run.columns["epoch"]) == [1, 2, 3] and np.isfinite(run.columns["lr"]).all()
    assert "test_acc" in run.attrs


def test_a_lengthened_run_keeps_its_new_length_across_a_stop(tiny_data_dir, tmp_path):
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    hist = tmp_path / "h.h5"
    quiet = dict(log=lambda s: None, progress=False)
    Trainer(tiny_config(name="ext", epochs=1), ds, tmp_path / "ext", hist, **quiet).run()
    assert "best_test_acc" in history.read_run(hist, "ext").attrs
    # As `train --resume --epochs 3`, stopped in epoch 2.
    with pytest.raises(TrainingInterrupted, match="--resume"):
        StopAt(tiny_config(name="ext", epochs=3), ds, tmp_path / "ext", hist, resume=True,
               stop_at=(2, 1), **quiet).run()
    saved = checkpoint.read_config(tmp_path / "ext")
    run = history.read_run(hist, "ext")
    assert saved["epochs"] == 3 and run.attrs["config"]["epochs"] == 3
    # Not finished any more: the first end's test results are gone with it.
    assert not set(history.FINAL_ATTRS) & set(run.attrs)
    # The command the stop printed (--resume without --epochs) trains to epoch 3.
    train_run(tiny_config(name="ext", epochs=1), data_dir=tiny_data_dir, out=tmp_path,
              history_path=hist, resume=True, quiet=True)
    run = history.read_run(hist, "ext")
    assert list(run.columns["epoch"]) == [1, 2, 3] and "test_acc" in run.attrs
    before = hist.read_bytes()
    files = sorted(p.name for p in (tmp_path / "ext").iterdir())
    with pytest.raises(UserError, match="has done 3 epochs.*--epochs 3 or more"):
        train_run(tiny_config(name="ext"), data_dir=tiny_data_dir, out=tmp_path,
                  history_path=hist, resume=True, epochs_override=2, quiet=True)
    assert hist.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == files   # no new events file
    # The facts of the run's start stay in config.json across the resumes.
    assert checkpoint.read_config(tmp_path / "ext")["normalization"] == saved["normalization"]


def test_sigint_to_the_cli_checkpoints_and_says_how_to_resume(tiny_data_dir, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "resnet-graph")
    args = [exe, "train", "plain", "--depth", "8", "--batch-size", "50", "--valid-size", "50",
            "--data-dir", str(tiny_data_dir), "--out", str(tmp_path)]
    proc = subprocess.Popen(args + ["--epochs", "200"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    index = tmp_path / "plain-8" / "checkpoint"
    deadline = time.monotonic() + 120
    while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "--resume" in err and "Traceback" not in err
    done = history.read_run(tmp_path / "histories.h5", "plain-8").epochs
    assert 1 <= done < 200
    resumed = subprocess.run(args + ["--resume", "--epochs", str(done + 1), "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = history.read_run(tmp_path / "histories.h5", "plain-8")
    assert list(run.columns["epoch"]) == list(range(1, done + 2))
    assert "test_acc" in run.attrs


class RatesAt(StopAt):
    """Records (steps taken before it, rate) of every step it runs."""

    def __init__(self, *args, rates, **kw):
        super().__init__(*args, **kw)
        self.rates = rates

    def run_step(self, fetches, step):
        t = self.t
        taken = int(self.sess.run(t.steps_taken))
        *out, lr = self.sess.run(list(fetches) + [t.learning_rate],
                                 {t.batch_index: step, t.training: True})
        self.rates.append((taken, float(lr)))
        return out


def test_lengthening_a_cosine_run_restarts_its_decay_from_the_rate_it_reached(
        tiny_data_dir, tmp_path):
    """`--resume --epochs 4` on a 3-epoch cosine run stopped after epoch 1 (5 steps an
    epoch): the steps before the seam trained on the 3-epoch schedule; the first step
    after it trains at the rate that schedule gives it, r, and the rest decays from r
    along a half cosine to 0 at the new end; config.json records it, so a stop and a
    plain --resume later rebuild the same schedule. An ended schedule is refused."""
    from resnet_graph.graph import cosine_rate
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, seed=0)
    hist = tmp_path / "h.h5"
    quiet = dict(log=lambda s: None, progress=False)
    cfg = tiny_config(name="cos", epochs=3, lr=0.1, lr_schedule="cosine", warmup_epochs=0.4,
                      augment=False)
    rates = []
    with pytest.raises(TrainingInterrupted):   # a stop in epoch 1's last step: at its end
        RatesAt(cfg, ds, tmp_path / "cos", hist, rates=rates, stop_at=(1, 4), **quiet).run()
    assert [s for s, _ in rates] == [0, 1, 2, 3, 4]
    old = [cosine_rate(cfg, s, 5) for s in range(15)]
    np.testing.assert_allclose([r for _, r in rates], old[:5], rtol=1e-6)
    with pytest.raises(TrainingInterrupted):   # lengthened to 4 epochs, stopped in epoch 2
        RatesAt(cfg.replace(epochs=4), ds, tmp_path / "cos", hist, rates=rates, resume=True,
                stop_at=(2, 2), **quiet).run()
    saved = checkpoint.read_config(tmp_path / "cos")
    assert saved["epochs"] == 4 and saved["decay_from_step"] == 5
    np.testing.assert_allclose(saved["decay_from_lr"], old[5], rtol=1e-6)
    # The seam: the last step before it and the first after it.
    assert rates[4] == (4, pytest.approx(old[4], rel=1e-6))
    assert rates[5] == (5, pytest.approx(old[5], rel=1e-6))
    assert 0.0 < old[5] < old[4] < 0.1
    # The resume without --epochs that the stop printed: config.json's schedule.
    train_run(tiny_config(name="cos"), data_dir=tiny_data_dir, out=tmp_path, history_path=hist,
              resume=True, quiet=True)
    run = history.read_run(hist, "cos")
    assert list(run.columns["epoch"]) == [1, 2, 3, 4]
    # The decay from old[5] at step 5 to 0 at step 20, as each epoch's last step saw it.
    want = [old[5] * 0.5 * (1 + np.cos(np.pi * (5 * e - 1 - 5) / 15)) for e in range(2, 5)]
    np.testing.assert_allclose(run.columns["lr"][1:], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run.columns["lr"][0], old[4], rtol=1e-6)
    # Finished (rate 0): a longer run would train at rate 0, so it is refused.
    before = hist.read_bytes()
    with pytest.raises(UserError, match="cosine schedule has ended.*start a new run"):
        train_run(tiny_config(name="cos"), data_dir=tiny_data_dir, out=tmp_path,
                  history_path=hist, resume=True, epochs_override=8, quiet=True)
    assert hist.read_bytes() == before
    assert checkpoint.read_config(tmp_path / "cos")["epochs"] == 4
