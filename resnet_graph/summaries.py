"""TensorBoard event files for a training run.

A run writes into its own folder, so ``tensorboard --logdir checkpoints`` shows
every run side by side. Tags:

=========================  ===================================================
``step/loss``              mean training loss of the steps since the previous
                           point (or the epoch's start), every
                           ``every_steps`` steps
``epoch/train_loss``       the history row of each epoch (also ``train_acc``,
``epoch/valid_loss`` ...   ``valid_loss``, ``valid_acc``, ``lr``,
                           ``images_per_sec``, and with fp16 ``skipped_steps``),
                           at the epoch's last step
``weights/<variable>``     histogram of each kernel, after epoch 1 and every
                           ``histogram_every`` epochs (about 2.6 kB a kernel,
                           85 kB for ResNet-32's 33: forty times the rest of
                           an epoch, so not every epoch)
``grad_norm/<layer>``      L2 norm of each kernel's gradient on the probe batch
                           (the history's ``grad_norm``, resnet_graph.probes),
                           once per epoch
``grad_norm/global``       L2 norm of all of them together
=========================  ===================================================

The graph (its GraphDef, what TensorBoard's graph tab draws; no MetaGraphDef,
which would hold it a second time) is written once, when the first step is
summarised, so after config.json: a disk that fills up fails on the run's own
files first. The x axis is the optimizer step throughout.

The file is a TFRecord file of ``Event`` records written in this process
(``tf.io.TFRecordWriter``), not by ``tf.compat.v1.summary.FileWriter``, whose
background thread reports a failed write as a traceback on stderr and then
goes on: here a write that fails (a full disk) stops the run with one line
that says why and what ``--resume`` then does, and the file is cut back to what
its last flush completed (after each epoch, and every ``flush_seconds`` within
one), so it gives the space back and still reads.
"""

import math
import os
import pathlib
import socket
import time

import tensorflow as tf

from .checkpoint import resume_advice
from .errors import UserError
from .fsutil import write_failure_reason

tf1 = tf.compat.v1

EPOCH_FIELDS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "images_per_sec",
                "skipped_steps")


def _scalar(tag: str, value: float):
    return tf1.Summary.Value(tag=tag, simple_value=float(value))


class EventsWriteError(UserError):
    """The events file could not be written (a full disk, a read-only folder)."""


class RunSummaries:
    """Event files of one run in ``logdir``."""

    histogram_every = 10   # epochs between weight histograms (and after epoch 1)
    flush_seconds = 30     # within an epoch, the step losses reach the file this often

    def __init__(self, logdir, every_steps: int = 50):
        self.logdir = pathlib.Path(logdir)
        self.every_steps = max(int(every_steps), 1)
        self.graph = None
        self.writer = None     # tf.io.TFRecordWriter of self.path, opened at the first step
        self.path = None
        self.complete = 0      # bytes of self.path up to its last successful flush
        self.flushed_at = 0.0
        self.histograms = None   # merged weight-histogram summary op

    def attach(self, total_loss, variables, scope_prefix: str = "model/") -> None:
        """Add the once-per-epoch ops to the default graph (before it is finalised)."""
        del total_loss   # the gradient norms come from the probe (see epoch)
        kernels = [v for v in variables if v.op.name.endswith("/kernel")]
        if not kernels:
            return
        histograms = []
        for v in kernels:
            name = v.op.name[len(scope_prefix):] if v.op.name.startswith(scope_prefix) \
                else v.op.name
            histograms.append(tf1.summary.histogram(f"weights/{name}", v))
        self.histograms = tf1.summary.merge(histograms)

    def open(self, graph) -> None:
        """Remember ``graph``; the file is created when the first step is summarised."""
        self.graph = graph

    def step(self, global_step: int, loss: float) -> None:
        if self.graph is None:
            return
        if self.writer is None:
            self._start()
        if global_step % self.every_steps == 0 and math.isfinite(loss):
            self._add(tf1.Summary(value=[_scalar("step/loss", loss)]), global_step)
            if time.monotonic() - self.flushed_at > self.flush_seconds:   # a long epoch
                self._flush()

    def epoch(self, sess, global_step: int, row: dict, feed: dict, grad_norms=None) -> None:
        """The epoch's history row, the gradient norms ``(layers, values)`` the probe
        measured (or None), and the weight histograms after epoch 1 and every
        ``histogram_every`` epochs."""
        if self.graph is None:
            return
        if self.writer is None:
            self._start()
        values = [_scalar(f"epoch/{k}", row[k]) for k in EPOCH_FIELDS
                  if k in row and math.isfinite(row[k])]
        if grad_norms is not None:
            layers, norms = grad_norms
            values += [_scalar(f"grad_norm/{name}", v) for name, v in zip(layers, norms)
                       if math.isfinite(v)]
            if all(math.isfinite(v) for v in norms):
                values.append(_scalar("grad_norm/global", math.sqrt(sum(v * v for v in norms))))
        self._add(tf1.Summary(value=values), global_step)
        epoch = int(row.get("epoch", 1))
        if self.histograms is not None and (epoch == 1 or epoch % self.histogram_every == 0):
            self._add(sess.run(self.histograms, feed), global_step)
        self._flush()

    def close(self) -> None:
        """Flush and close the file; a failure here (the run is ending anyway, and this
        runs in a ``finally``) only cuts the file back to its last complete epoch."""
        if self.writer is not None:
            try:
                self._flush()
            except EventsWriteError:
                pass
            self._drop_writer()

    # -- the file ------------------------------------------------------------------
    def _start(self) -> None:
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        try:
            self.writer = tf.io.TFRecordWriter(str(self.path))
        except (tf.errors.OpError, OSError) as e:
            self._failed(e)
        self._record(tf1.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._record(tf1.Event(wall_time=time.time(), step=0,
                               graph_def=self.graph.as_graph_def().SerializeToString()))
        self._flush()

    def _add(self, summary, global_step: int) -> None:
        if isinstance(summary, bytes):   # a merged summary op's value
            summary = tf1.Summary.FromString(summary)
        self._record(tf1.Event(wall_time=time.time(), step=int(global_step), summary=summary))

    def _record(self, event) -> None:
        try:
            self.writer.write(event.SerializeToString())
        except (tf.errors.OpError, OSError) as e:
            self._failed(e)

    def _flush(self) -> None:
        try:
            self.writer.flush()
            self.complete = os.path.getsize(self.path)
            self.flushed_at = time.monotonic()
        except (tf.errors.OpError, OSError) as e:
            self._failed(e)

    def _drop_writer(self) -> None:
        try:
            self.writer.close()
        except (tf.errors.OpError, OSError):
            pass
        self.writer = None

    def _failed(self, error) -> None:
        """Cut the file back to what its last flush completed (remove it if that is
        nothing), free what the failed write took, and stop the run with one line."""
        if self.writer is not None:
            self._drop_writer()
        self.graph = None   # no more writes
        try:
            if self.complete:
                os.truncate(self.path, self.complete)
            elif self.path is not None:
                os.remove(self.path)
        except OSError:
            pass
        reason = write_failure_reason(error, self.logdir)
        raise EventsWriteError(f"could not write the TensorBoard events file {self.path}: "
                               f"{reason}; {resume_advice(self.logdir, reason)}") from None
