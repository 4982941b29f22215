"""TensorBoard event files for a training run (``tf.compat.v1.summary.FileWriter``).

A run writes into its own folder, so ``tensorboard --logdir checkpoints`` shows
every run side by side. Tags:

=========================  ===================================================
``step/loss``              training loss of one step, every ``every_steps`` steps
``epoch/train_loss``       the history row of each epoch (also ``train_acc``,
``epoch/valid_loss`` ...   ``valid_loss``, ``valid_acc``, ``lr``,
                           ``images_per_sec``, and with fp16 ``skipped_steps``),
                           at the epoch's last step
``weights/<variable>``     histogram of each kernel, once per epoch
``grad_norm/<variable>``   L2 norm of each kernel's gradient on one training
                           batch, once per epoch
``grad_norm/global``       L2 norm of all of them together
=========================  ===================================================

The graph is written once, when the writer opens. The x axis is the optimizer
step throughout.
"""

import math
import pathlib

import tensorflow as tf

tf1 = tf.compat.v1

EPOCH_FIELDS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "images_per_sec",
                "skipped_steps")


def _scalar(tag: str, value: float):
    return tf1.Summary.Value(tag=tag, simple_value=float(value))


class RunSummaries:
    """Event files of one run in ``logdir``."""

    def __init__(self, logdir, every_steps: int = 50):
        self.logdir = pathlib.Path(logdir)
        self.every_steps = max(int(every_steps), 1)
        self.writer = None
        self.coarse = None   # merged histogram and gradient-norm summary op

    def attach(self, total_loss, variables, scope_prefix: str = "model/") -> None:
        """Add the once-per-epoch ops to the default graph (before it is finalised)."""
        kernels = [v for v in variables if v.op.name.endswith("/kernel")]
        if not kernels:
            return
        grads = tf.gradients(total_loss, kernels)
        summaries = []
        for v, g in zip(kernels, grads):
            name = v.op.name[len(scope_prefix):] if v.op.name.startswith(scope_prefix) \
                else v.op.name
            summaries.append(tf1.summary.histogram(f"weights/{name}", v))
            if g is not None:
                summaries.append(tf1.summary.scalar(f"grad_norm/{name}",
                                                    tf.norm(tf.cast(g, tf.float32))))
        present = [tf.cast(g, tf.float32) for g in grads if g is not None]
        if present:
            summaries.append(tf1.summary.scalar("grad_norm/global", tf.linalg.global_norm(present)))
        self.coarse = tf1.summary.merge(summaries)

    def open(self, graph) -> None:
        with graph.as_default():   # the v1 writer refuses eager mode
            self.writer = tf1.summary.FileWriter(str(self.logdir), graph=graph, flush_secs=30)

    def step(self, global_step: int, loss: float) -> None:
        if self.writer is not None and global_step % self.every_steps == 0 and math.isfinite(loss):
            self.writer.add_summary(tf1.Summary(value=[_scalar("step/loss", loss)]), global_step)

    def epoch(self, sess, global_step: int, row: dict, feed: dict) -> None:
        """The epoch's history row, and the coarse summaries on the batch of ``feed``."""
        if self.writer is None:
            return
        values = [_scalar(f"epoch/{k}", row[k]) for k in EPOCH_FIELDS
                  if k in row and math.isfinite(row[k])]
        self.writer.add_summary(tf1.Summary(value=values), global_step)
        if self.coarse is not None:
            self.writer.add_summary(sess.run(self.coarse, feed), global_step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
