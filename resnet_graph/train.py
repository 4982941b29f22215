"""The session loop: one run of one model, with a small fixed lifecycle.

``Trainer.run`` calls ``before_train`` (graph, session, data, restore), then
for every remaining epoch ``before_epoch`` (that epoch's order), the steps,
and ``after_epoch`` (validation, history row, checkpoint, one summary line),
and finally ``after_train`` (test metrics); the session is closed in
``finally`` whatever happens.

Order of writes at the end of an epoch: the history row first, then the
best-validation checkpoint (``<run>/best/``) when the epoch beat every earlier
one, then the latest checkpoint. A process killed between the two resumes from the previous
checkpoint and drops the history rows after it (``history.truncate``), so the
history never has gaps or duplicates.
"""

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading
import time
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from . import checkpoint, data, history
from .config import TrainConfig, check_batch_split, run_facts
from .errors import TrainingInterrupted, UserError
from .evaluate import Metrics, evaluate
from .graph import MODEL_SCOPE, READ_EVERY_STEPS, lengthened, step_fetches, sums_fetches
from .inputs import epoch_order
from .precision import check_runnable, gpu_available, resolve_data_format, resolve_precision
from .probes import GRAD_NORM, GradientProbe, attach_gradient_probe
from .progress import epoch_progress
from .replicate import build_replicated_graph, tower_device_type
from .runtime import describe_device, session_config
from .summaries import RunSummaries

tf1 = tf.compat.v1


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN)."""


@dataclasses.dataclass
class EpochSums:
    """The running sums of an epoch as read from the graph (``epoch_progress``):
    of the applied steps only; with fp16 the skipped steps and the loss scale."""

    loss_sum: float
    hits: float
    steps: int = 0             # steps of the epoch taken when read, applied or skipped
    skipped: int = 0
    scale: float = math.inf    # no loss scaling: no floor to reach

    def since(self, earlier: "EpochSums") -> float:
        """The mean loss of the steps applied between ``earlier`` and these sums (NaN
        when none was)."""
        applied = (self.steps - self.skipped) - (earlier.steps - earlier.skipped)
        return (self.loss_sum - earlier.loss_sum) / applied if applied > 0 else math.nan


class Trainer:
    """Train ``cfg`` on ``dataset``, writing into ``run_dir`` and ``history_path``.

    Args:
      cfg: the resolved configuration (``precision``/``data_format`` may be ``auto``).
      dataset: the loaded splits and normalisation statistics.
      run_dir: the run folder (checkpoints, config.json).
      history_path: the HDF5 history file.
      resume: continue from the latest checkpoint in ``run_dir``.
      log: where summary lines go (``print`` by default).
      progress: show progress within each epoch (a bar in a terminal, else a
        line about every 10% through ``log``; see resnet_graph.progress).
      eval_batch_size: batch size of validation and test evaluation.
      devices: towers (one per GPU, else per logical CPU device) that split
        each global batch of ``cfg.batch_size`` images (docs/distributed.md).
    """

    workers = 1   # processes that share each step (resnet_graph.distributed)
    summary_steps = 50   # TensorBoard: the step loss every this many steps
    # The per-layer gradient norms of every epoch (history ``grad_norm``, probes.py); a
    # switch for measuring what they cost (bench/gradflow_cost.py), on in every run.
    record_gradients = True
    read_every_steps = READ_EVERY_STEPS   # the running sums are read (and checked) at least
    #                                       this often (graph.READ_EVERY_STEPS)

    def __init__(self, cfg: TrainConfig, dataset: data.Cifar10, run_dir, history_path, *,
                 resume: bool = False, log: Callable[[str], None] = print,
                 progress: bool = True, eval_batch_size: int = 500, devices: int = 1):
        self.cfg = cfg
        self.dataset = dataset
        self.run_dir = pathlib.Path(run_dir)
        self.history_path = pathlib.Path(history_path)
        self.resume = resume
        self.log = log
        self.progress_bar = progress
        self.eval_batch_size = eval_batch_size
        gpu = gpu_available()
        self.precision = resolve_precision(cfg.precision, gpu)
        self.data_format = resolve_data_format(cfg.data_format, gpu, self.precision)
        check_runnable(self.precision, self.data_format, cfg.xla)
        self.steps_per_epoch = len(dataset.train) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"batch size {cfg.batch_size} is larger than the {len(dataset.train)} "
                            "training images; lower --batch-size")
        self.devices = int(devices)
        self.device_type = tower_device_type(self.devices)
        check_batch_split(cfg.batch_size, self.devices, self.workers)
        self.sess = None
        self.t = None
        self.saver = None
        self.start_epoch = 1
        self.start_step = 0            # first step of start_epoch (after a mid-epoch stop)
        self.progress = (0.0, 0.0, 0.0)  # that epoch's loss sum, accuracy sum, seconds
        self.stop_signal: Optional[int] = None
        self.result: Optional[Metrics] = None
        self.best_saver = None
        self.best_acc = -math.inf       # best validation accuracy so far (from the history)
        self.best_epoch = 0
        self.summaries: Optional[RunSummaries] = None   # TensorBoard events
        self.probe: Optional[GradientProbe] = None

    # -- lifecycle -----------------------------------------------------------------
    def run(self) -> Optional[Metrics]:
        """Train the remaining epochs; return the test metrics (None if no epochs ran)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with checkpoint.run_lock(self.run_dir), self._stop_on_signals():
            try:
                self.train_epochs()
            finally:
                if self.summaries is not None:
                    self.summaries.close()
                if self.sess is not None:
                    self.sess.close()
        return self.result

    def train_epochs(self) -> None:
        """The lifecycle proper: before_train, each remaining epoch, after_train."""
        self.before_train()
        for epoch in range(self.start_epoch, self.cfg.epochs + 1):
            self.before_epoch(epoch)
            row = self.run_epoch(epoch)
            self.after_epoch(epoch, row)
            if self.stop_signal is not None:
                # Asked during the epoch's last step or its validation: the epoch is
                # complete (row and checkpoint), so the run stops at its boundary.
                self._stop(epoch, self.steps_per_epoch)
        self.after_train()

    def request_stop(self, signal_number: int = signal.SIGINT) -> None:
        """Stop after the current step, write a checkpoint, raise TrainingInterrupted."""
        self.stop_signal = signal_number

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT/SIGTERM request a stop after the current step; a
        second one while stopping acts as usual (the last checkpoint stays valid)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        saved = {}

        def handle(number, frame):
            if self.stop_signal is not None:
                signal.signal(number, saved.get(number) or signal.SIG_DFL)
                signal.raise_signal(number)
                return
            self.request_stop(number)

        for sig in (signal.SIGINT, signal.SIGTERM):
            saved[sig] = signal.signal(sig, handle)
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def attach_train_graph(self):
        """Build the training graph in the default graph; a hook (distributed runs)."""
        ds = self.dataset
        return build_replicated_graph(self.cfg, ds.mean, ds.std, len(ds.train),
                                      precision=self.precision, data_format=self.data_format,
                                      devices=self.devices, device_type=self.device_type)

    def make_session(self, graph):
        """The session that trains ``graph``; a hook (distributed runs)."""
        return tf1.Session(graph=graph, config=self.session_config())

    def session_config(self):
        """The session's ConfigProto: with towers on the CPU, one logical CPU device each."""
        return session_config(self.devices if self.device_type == "CPU" else 1)

    def build(self):
        """Graph, savers and session; returns the initialiser op."""
        if self.cfg.deterministic:
            # Process-wide and for good: every later graph of this process too.
            tf.config.experimental.enable_op_determinism()
        graph = tf.Graph()
        with graph.as_default():
            self.t = self.attach_train_graph()
            if self.record_gradients:
                self.probe = attach_gradient_probe(self.cfg, self.t, self.t.loss_scale)
            self.saver = checkpoint.make_saver()
            self.best_saver = checkpoint.make_saver(max_to_keep=1)
            self.summaries = self.make_summaries()
            if self.summaries is not None:
                self.summaries.attach(self.t.total_loss, tf1.trainable_variables(MODEL_SCOPE))
            init = tf1.global_variables_initializer()
        graph.finalize()
        self.sess = self.make_session(graph)
        if self.summaries is not None:
            self.summaries.open(graph)
        return init

    def make_summaries(self) -> Optional[RunSummaries]:
        """TensorBoard events in the run folder; a hook (None writes none)."""
        return RunSummaries(self.run_dir, every_steps=self.summary_steps)

    def before_train(self):
        if self.resume:
            self.cfg = self._lengthened()
        cfg, ds = self.cfg, self.dataset
        if not self.resume and ((self.run_dir / "config.json").exists() or (
                self.history_path.exists() and history.has_run(self.history_path, cfg.name, guard=False))):
            # Checked again under the run lock: another start of the same name may
            # have finished between train_run's check and this process taking the lock.
            raise UserError(f"run {cfg.name!r} already exists (in {self.run_dir} or "
                            f"{self.history_path}); pass --resume or choose another --name")
        init = self.build()
        prefix = checkpoint.latest(self.run_dir) if self.resume else None
        if prefix:
            switched = self.restore_checkpoint(prefix, init)
            checkpoint.adopt_existing(self.saver, self.run_dir)
            checkpoint.adopt_existing(self.best_saver, self.run_dir / checkpoint.BEST_DIR)
            done = self.restore_position(prefix)
            history.truncate(self.history_path, cfg.name, int(done))
            # --epochs may have grown: config.json and the history say the new length (what
            # a later --resume gets; the rest, the facts of the run's start included, stays),
            # and a run with epochs to go has no test results yet.
            saved = checkpoint.read_config(self.run_dir)
            config = dict(saved, epochs=cfg.epochs, **switched)
            if cfg.decay_from_step:   # what the lengthening decided (see _lengthened)
                config.update(decay_from_step=cfg.decay_from_step, decay_from_lr=cfg.decay_from_lr)
            if config != saved:
                checkpoint.write_config_data(self.run_dir, config)
            unfinished = {key: None for key in history.FINAL_ATTRS} if done < cfg.epochs else {}
            if switched:
                unfinished.update(precision=self.precision, data_format=self.data_format)
                self.log(f"{cfg.name} goes on in {self.precision} {self.data_format} (it trained "
                         f"in {saved.get('resolved_precision')} "
                         f"{saved.get('resolved_data_format')} until now)")
            history.set_attrs(self.history_path, cfg.name, status=None, failure=None,
                              config=config, **unfinished)
            self._best_from_history()
        else:
            self.sess.run(init)
            self._write_config()
            history.create_run(self.history_path, cfg.name, config=self._config_dict(),
                               attrs=self._history_attrs(), exist_ok=self.resume)
            if self.resume and history.read_run(self.history_path, cfg.name, guard=False).epochs:
                history.truncate(self.history_path, cfg.name, 0)
        self.sess.run(self.t.load_data, {self.t.data_images: ds.train.images,
                                         self.t.data_labels: ds.train.labels})
        for line in self.describe_start(prefix):
            self.log(line)

    def describe_start(self, prefix: Optional[str] = None) -> list:
        """What this run is, in two lines for its log before the first step: the model,
        recipe, length, what ``auto`` resolved, the devices; the data, the run folder and
        history, and where it starts (``prefix``: the checkpoint it resumed from). A third
        line when a cosine warm-up fills the whole run (it then never decays)."""
        cfg, ds = self.cfg, self.dataset

        def chosen(value, asked):
            if prefix:   # --resume goes on with what the run resolved when it started
                return f"{value} (the run's)"
            return f"{value} (auto)" if asked == "auto" else value

        def count(n, what):
            return f"{n} {what}{'' if n == 1 else 's'}"

        towers = count(self.devices, "tower") + (
            f" on {self.device_type} devices" if self.devices > 1 else "")
        what = (f"{cfg.name}: {cfg.model} depth {cfg.depth}, {cfg.recipe} recipe, "
                f"{cfg.epochs} epochs x {self.steps_per_epoch} steps of {cfg.batch_size} images; "
                f"precision {chosen(self.precision, cfg.precision)}, layout "
                f"{chosen(self.data_format, cfg.data_format)}, XLA {'on' if cfg.xla else 'off'}; "
                f"{describe_device()}; {towers}, {count(self.workers, 'worker')}")
        if prefix and self.start_step:   # a checkpoint written by a stop within an epoch
            start = (f"resuming {cfg.name} at step {self.start_step} of epoch "
                     f"{self.start_epoch} from {prefix}")
        elif prefix:
            start = f"resuming {cfg.name} after epoch {self.start_epoch - 1} from {prefix}"
        elif self.resume:
            start = f"resuming {cfg.name}: it has no checkpoint yet, so it starts at epoch 1"
        else:
            start = f"{cfg.name}: a new run, starting at epoch 1"
        where = (f"{len(ds.train)} training / {len(ds.valid)} validation / {len(ds.test)} test "
                 f"images from {ds.data_dir}; run folder {self.run_dir}, history "
                 f"{self.history_path}")
        lines = [what, f"{start}; {where}"]
        if cfg.lr_schedule == "cosine" and not cfg.decay_from_step \
                and cfg.warmup_epochs >= cfg.epochs:
            # graph.learning_rate caps the warm-up at the run's length: say so, since the
            # run then never decays (e.g. a `fast` run cut to --epochs 2 or fewer).
            lines.append(f"{cfg.name}: the cosine warm-up ({cfg.warmup_epochs:g} epochs) is as "
                         f"long as the run ({cfg.epochs}), so the rate rises to {cfg.lr:g} and "
                         f"never decays; pass --warmup-epochs below {cfg.epochs} to decay")
        return lines

    def restore_checkpoint(self, prefix: str, init) -> dict:
        """Restore ``prefix`` into the session; returns the new ``resolved_*`` entries
        of config.json when the run goes on in another precision or layout than it
        started with (``train --resume --precision/--data-format``), else {}.

        fp16 checkpoints hold ``loss_scaling/*`` variables that other precisions' graphs
        lack, and the reverse: such a switch restores every variable both have (the
        rest keeps its initial value: a fresh loss scale) and carries the position,
        so that steps fp16 skipped stay counted (steps taken = ``global_step`` +
        ``loss_scaling/skipped_steps``; without loss scaling ``global_step`` alone).
        A checkpoint of an earlier version that lacks variables added since
        (checkpoint.LATER_VARIABLES) is restored by checkpoint.restore, and one line
        says what their initial values mean.
        """
        saved = checkpoint.read_config(self.run_dir)
        resolved = {"resolved_precision": self.precision, "resolved_data_format": self.data_format}
        was = {key: saved.get(key, value) for key, value in resolved.items()}
        if was == resolved:
            later = checkpoint.restore(self.sess, self.saver, prefix)
            if later:
                self.log(f"{prefix} predates {', '.join(later)} (added by a later version): "
                         f"{'; '.join(later.values())}")
            return {}
        self.sess.run(init)
        reader = checkpoint.load_present(self.sess, prefix)
        skipped = "loss_scaling/skipped_steps"
        if self.t.skipped_steps is None and reader.has_tensor(skipped):
            with self.sess.graph.as_default():
                self.t.global_step.load(reader.get_tensor("global_step")
                                        + reader.get_tensor(skipped), self.sess)
        return resolved

    def _lengthened(self) -> TrainConfig:
        """``--resume --epochs N`` past the length in config.json: the configuration with
        the schedule graph.lengthened decides for the steps the latest checkpoint has
        taken (a cosine decay restarts from its current rate, an ended one is refused),
        before anything is built or written."""
        cfg = self.cfg
        prefix = checkpoint.latest(self.run_dir)
        if not prefix or not (self.run_dir / "config.json").is_file():
            return cfg
        before = int(checkpoint.read_config(self.run_dir).get("epochs", cfg.epochs))
        if before >= cfg.epochs:
            return cfg
        taken = int(checkpoint.read_tensor(prefix, "global_step")) + int(
            checkpoint.read_tensor(prefix, "loss_scaling/skipped_steps", default=0))
        try:
            return lengthened(cfg.replace(epochs=before), cfg.epochs, taken, self.steps_per_epoch)
        except ValueError as e:
            raise UserError(f"run {cfg.name!r} cannot train to {cfg.epochs} epochs: {e}") from None

    def restore_position(self, prefix: str = "the checkpoint") -> int:
        """Where the restored variables say the run is: the next epoch, the step in
        it (from the steps *taken*, so fp16 steps that loss scaling skipped count,
        see graph.py) and that epoch's running sums. Returns the epochs done."""
        done, steps, progress = self.sess.run(
            [self.t.epochs_done, self.t.steps_taken, self.t.epoch_progress])
        done = int(done)
        self.start_epoch = done + 1
        self.start_step = int(steps) - done * self.steps_per_epoch
        if not 0 <= self.start_step <= self.steps_per_epoch:
            raise checkpoint.CheckpointError(
                f"{prefix} is at step {steps}, which does not fit epoch {done} "
                f"with {self.steps_per_epoch} steps per epoch; was config.json edited?")
        self.progress = tuple(float(v) for v in progress)
        return done

    def before_epoch(self, epoch: int):
        order = epoch_order(self.cfg.seed, epoch, len(self.dataset.train))
        self.sess.run(self.t.set_permutation, {self.t.permutation: order})

    def run_epoch(self, epoch: int) -> dict:
        """The training steps of one epoch; returns the partial history row.

        Starts at ``start_step`` with the restored sums when a checkpoint was
        written in the middle of this epoch. A requested stop ends it after the
        current step with a checkpoint (see :meth:`request_stop`).
        """
        t, cfg, n = self.t, self.cfg, self.steps_per_epoch
        first = self.start_step if epoch == self.start_epoch else 0
        before = self.progress[2] if first else 0.0
        if not first:   # the graph's running sums start the epoch at zero
            self.sess.run(t.set_epoch_progress, {t.progress_placeholder: [0.0, 0.0, 0.0]})
        start = time.perf_counter() - before
        bar = epoch_progress(f"epoch {epoch}/{cfg.epochs}", first, n,
                             cfg.batch_size, enabled=self.progress_bar, log=self.log)
        sums = None
        checked = first      # steps of the epoch whose loss the last read covered
        # The sums at the last TensorBoard point (or the epoch's start): a point's
        # step/loss is the mean loss of the steps applied since.
        marked = self._read_sums(epoch, first, first) if self.summaries is not None else None
        fetches = step_fetches(t)
        for step in range(first, n):
            number = (epoch - 1) * n + step + 1     # 1-based step of the run
            point = self.summaries is not None and number % self.summaries.every_steps == 0
            last = step + 1 == n
            self.run_step(fetches, step)
            self.after_step(epoch, step)
            stopping = self.stop_signal is not None and not last
            done = step + 1
            if (stopping or last or point or bar.wants(step)
                    or done - checked >= self.read_every_steps):
                sums = self._read_sums(epoch, checked, done)
                checked = done
                if point:
                    self.summaries.step(number, sums.since(marked))
                    marked = sums
                elapsed = time.perf_counter() - start - before
                rate = (done - first) * cfg.batch_size / elapsed if elapsed > 0 else 0.0
                bar.update(step, sums.loss_sum, sums.hits, rate, applied=done - sums.skipped,
                           skipped=sums.skipped if t.epoch_skipped is not None else None)
            else:
                bar.update(step)
            if stopping:
                bar.close()
                self._stop(epoch, done, (sums.loss_sum, sums.hits, time.perf_counter() - start),
                           skipped=sums.skipped)
        bar.close()
        train_seconds = time.perf_counter() - start
        if sums is None:     # resumed from a checkpoint after the epoch's last step
            sums = self._read_sums(epoch, first, n)
        lr = self.sess.run(t.last_step_lr)
        applied = n - sums.skipped
        if applied == 0:
            self._fail(f"fp16 loss scaling skipped every step of epoch {epoch} (inf or NaN "
                       f"gradients at every loss scale down to {sums.scale:g}): the run is "
                       f"diverging; the last good checkpoint is kept: lower --lr and --resume, "
                       "or train in --precision fp32")
        row = {"epoch": epoch, "train_loss": sums.loss_sum / applied,
               "train_acc": sums.hits / applied,
               "lr": float(lr), "train_seconds": train_seconds,
               "images_per_sec": (n - first) * cfg.batch_size / (train_seconds - before)
               if train_seconds > before else float("nan"),
               "_start": start}
        if t.epoch_skipped is not None:
            row["skipped_steps"] = sums.skipped
        return row

    def _read_sums(self, epoch: int, after: int, done: int) -> "EpochSums":
        """Read the graph's running sums after step ``done`` (1-based) of ``epoch`` and
        fail on what they show: a loss that is not finite (it became so in one of steps
        ``after + 1 .. done``, the ones since the last read), or with fp16 a loss scale
        that fell to its floor."""
        t = self.t
        values = self.sess.run(sums_fetches(t))
        sums = EpochSums(float(values[0][0]), float(values[0][1]), steps=done)
        if t.epoch_skipped is not None:
            sums.skipped, sums.scale = int(values[1]), float(values[2])
        if not math.isfinite(sums.loss_sum):
            where = (f"step {done}" if done == after + 1 else
                     f"one of steps {after + 1}-{done} (the loss is checked every "
                     f"{self.read_every_steps} steps)")
            self._fail(f"loss became {sums.loss_sum} at epoch {epoch}, {where}; the last good "
                       "checkpoint is kept: lower --lr and --resume")
        if sums.scale <= 1.0:
            self._fail(f"fp16 loss scaling reached its floor (a scale of 1) at epoch {epoch}, "
                       f"step {done}, with {sums.skipped} of the epoch's {done} steps skipped "
                       "for inf or NaN gradients: the run is diverging; the last good checkpoint "
                       "is kept: lower --lr and --resume, or train in --precision fp32")
        return sums

    def _fail(self, message: str) -> None:
        """Mark the history run as failed (no row is appended) and stop with ``message``."""
        history.set_attrs(self.history_path, self.cfg.name, status="failed", failure=message)
        raise TrainingError(message)

    def run_step(self, fetches, step: int):
        """Run training step ``step`` (0-based, in the epoch); a hook (distributed runs)."""
        return self.sess.run(fetches, {self.t.batch_index: step, self.t.training: True})

    def after_step(self, epoch: int, step: int) -> None:
        """Called after every training step (0-based ``step`` of ``epoch``); a hook."""

    def _stop(self, epoch: int, steps_done: int, progress=None, skipped: int = 0) -> None:
        """Raise TrainingInterrupted after step ``steps_done`` of ``epoch``, with a checkpoint
        of the epoch's running sums ``progress`` (loss, accuracy, seconds) and ``skipped``
        steps (fp16); None: at the end of the epoch, whose own checkpoint is the one to
        resume from."""
        t = self.t
        if progress is None:
            prefix = checkpoint.require_latest(self.run_dir)
        else:
            feed = {t.progress_placeholder: list(progress)}
            if t.skipped_value is not None:
                feed[t.skipped_value] = skipped
            self.sess.run(t.set_epoch_progress, feed)
            prefix = checkpoint.save(self.sess, self.saver, self.run_dir,
                                     int(self.sess.run(t.steps_taken)))
        name = signal.Signals(self.stop_signal).name
        raise TrainingInterrupted(
            f"{name}: stopped after step {steps_done} of epoch {epoch}; checkpoint {prefix} "
            f"written; continue with: resnet-graph train {self.cfg.model} --name {self.cfg.name} "
            f"--out {self.run_dir.parent}{self._history_option()} --resume", self.stop_signal)

    def _history_option(self) -> str:
        default = self.run_dir.parent / "histories.h5"
        return "" if self.history_path == default else f" --history {self.history_path}"

    def after_epoch(self, epoch: int, row: dict):
        start = row.pop("_start")
        if len(self.dataset.valid):
            valid = evaluate(self.sess, self.t.evaluation, self.dataset.valid,
                             batch_size=self.eval_batch_size, name="valid")
            row.update(valid_loss=valid.loss, valid_acc=valid.accuracy)
        else:
            row.update(valid_loss=float("nan"), valid_acc=float("nan"))
        matrices = {}
        if self.probe is not None:
            began = time.perf_counter()
            matrices[GRAD_NORM] = (self.probe.layers, self.gradient_norms())
            row["grad_norm_seconds"] = time.perf_counter() - began
        row["seconds"] = time.perf_counter() - start
        history.append_epoch(self.history_path, self.cfg.name, row, matrices)
        if self.summaries is not None:
            self.summaries.epoch(self.sess, epoch * self.steps_per_epoch, row,
                                 {self.t.batch_index: 0, self.t.training: True},
                                 matrices.get(GRAD_NORM))
        if row["valid_acc"] > self.best_acc:   # NaN (no validation split) never is
            self.best_acc, self.best_epoch = row["valid_acc"], epoch
            checkpoint.save_best(self.sess, self.best_saver, self.run_dir, epoch, row["valid_acc"])
        self.sess.run(self.t.set_epochs_done, {self.t.epoch_placeholder: epoch})
        self.sess.run(self.t.set_epoch_progress, {self.t.progress_placeholder: [0.0, 0.0, 0.0]})
        checkpoint.save(self.sess, self.saver, self.run_dir, int(self.sess.run(self.t.steps_taken)))
        valid = (f"valid loss {row['valid_loss']:.4f} acc {row['valid_acc']:.4f}"
                 if len(self.dataset.valid) else "no validation split")
        self.log(f"epoch {epoch}/{self.cfg.epochs}  "
                 f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  {valid}  "
                 f"lr {row['lr']:.3g}  {row['seconds']:.1f}s  {row['images_per_sec']:.0f} img/s")

    def gradient_norms(self):
        """Each weighted layer's gradient norm on the probe batch: the first
        ``batch_size`` training images, unaugmented, in training mode (probes.py)."""
        train = self.dataset.train
        n = min(self.cfg.batch_size, len(train))
        return self.sess.run(self.probe.norms,
                             self.probe.feed(train.images[:n], train.labels[:n]))

    def after_train(self):
        """Test metrics of the final model and, when it differs, of the best-validation one
        (of their averaged weights in an ``ema_decay`` run, as every evaluation)."""
        test = evaluate(self.sess, self.t.evaluation, self.dataset.test,
                        batch_size=self.eval_batch_size, name="test")
        attrs = {"test_loss": test.loss, "test_acc": test.accuracy}
        self.result = test
        self.log(f"test loss {test.loss:.4f} acc {test.accuracy:.4f} ({test.examples} images)")
        if self.best_epoch:
            best = test
            if self.best_epoch != self.cfg.epochs:
                # The latest checkpoint is on disk; the session's weights are free to go.
                checkpoint.restore(self.sess, self.best_saver,
                                   checkpoint.require_latest(self.run_dir, best=True))
                best = evaluate(self.sess, self.t.evaluation, self.dataset.test,
                                batch_size=self.eval_batch_size, name="test")
                self.log(f"best validation epoch {self.best_epoch}: test loss {best.loss:.4f} "
                         f"acc {best.accuracy:.4f}")
            attrs.update(best_epoch=self.best_epoch, best_valid_acc=self.best_acc,
                         best_test_loss=best.loss, best_test_acc=best.accuracy)
        history.set_attrs(self.history_path, self.cfg.name, **attrs)

    # -- helpers ---------------------------------------------------------------------
    def _best_from_history(self) -> None:
        """The best validation accuracy of the epochs kept in the history."""
        run = history.read_run(self.history_path, self.cfg.name, guard=False)
        accs = np.asarray(run.columns["valid_acc"], dtype=np.float64)
        if np.isfinite(accs).any():
            i = int(np.nanargmax(accs))
            self.best_acc, self.best_epoch = float(accs[i]), int(run.columns["epoch"][i])

    def _config_dict(self) -> dict:
        d = self.cfg.to_dict()
        d.update(self._extra_config())
        return d

    def _extra_config(self) -> dict:
        ds = self.dataset
        return run_facts(normalization={"mean": list(ds.mean), "std": list(ds.std)},
                         data_dir=str(ds.data_dir), resolved_precision=self.precision,
                         resolved_data_format=self.data_format, train_images=len(ds.train),
                         valid_images=len(ds.valid), devices=self.devices, workers=self.workers)

    def _write_config(self):
        checkpoint.write_config(self.run_dir, self.cfg, **self._extra_config())

    def _history_attrs(self) -> dict:
        return {"tensorflow_version": tf.__version__, "device": describe_device(),
                "precision": self.precision, "data_format": self.data_format,
                "devices": self.devices, "workers": self.workers}
