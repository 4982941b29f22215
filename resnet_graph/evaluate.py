"""Metrics over a whole split, in inference mode; shared by ``train`` and ``eval``.

Sums per-image losses and hits over batches, so the result does not depend on
the batch size (batch norm uses its moving averages here, so an image's
output does not depend on its batch either).

With ``flip`` (test-time augmentation), each image is classified as itself and
mirrored left-right, the two softmax outputs are averaged, and the loss is the
cross-entropy of that average.
"""

import contextlib
import dataclasses
import pathlib
from typing import Optional

import numpy as np
import tensorflow as tf

from . import checkpoint, data, fetch
from .config import TrainConfig
from .data import NUM_CLASSES
from .errors import DataError
from .graph import attach_model, restore_variables
from .precision import eval_precision, resolve_data_format
from .runtime import session_config

tf1 = tf.compat.v1


@dataclasses.dataclass(frozen=True)
class Metrics:
    split: str
    examples: int
    loss: float
    accuracy: float
    confusion: np.ndarray   # [10, 10] int64, rows = true class
    predictions: Optional[np.ndarray] = None   # int32 [examples], when asked for
    tta: str = "none"                          # test-time augmentation: none or flip

    @property
    def per_class_accuracy(self):
        totals = self.confusion.sum(axis=1)
        hits = np.diag(self.confusion)
        return [float(h / t) if t else 0.0 for h, t in zip(hits, totals)]

    def to_json(self) -> dict:
        return {"split": self.split, "examples": self.examples, "loss": self.loss,
                "accuracy": self.accuracy, "per_class_accuracy": self.per_class_accuracy,
                "confusion": self.confusion.tolist(), "tta": self.tta}


def _flip_averaged(sess, tensors, images, labels):
    """Per-image loss and prediction from the mean softmax of the images and their mirrors."""
    probs = [sess.run(tensors.probabilities, {tensors.images: batch, tensors.training: False})
             for batch in (images, images[:, :, ::-1, :])]
    mean = (probs[0].astype(np.float64) + probs[1]) / 2
    losses = -np.log(np.maximum(mean[np.arange(len(labels)), labels], np.finfo(np.float64).tiny))
    return losses, np.argmax(mean, axis=1).astype(np.int32)


def evaluate(sess, tensors, split: data.Split, *, batch_size: int = 500, name: str = "",
             keep_predictions: bool = False, flip: bool = False) -> Metrics:
    """Loss, accuracy and confusion matrix of the model in ``tensors`` on ``split``
    (with ``keep_predictions``, also every image's predicted class; with
    ``flip``, averaged over each image and its mirror image)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    total_loss = 0.0
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    kept = []
    for start in range(0, len(split), batch_size):
        images = split.images[start:start + batch_size]
        labels = split.labels[start:start + batch_size]
        if flip:
            losses, predictions = _flip_averaged(sess, tensors, images, labels)
        else:
            losses, predictions = sess.run(
                [tensors.example_loss, tensors.predictions],
                {tensors.images: images, tensors.labels: labels, tensors.training: False})
        total_loss += float(np.sum(losses, dtype=np.float64))
        np.add.at(confusion, (labels, predictions), 1)
        if keep_predictions:
            kept.append(predictions)
    n = len(split)
    hits = int(np.trace(confusion))
    return Metrics(split=name, examples=n, loss=total_loss / n if n else float("nan"),
                   accuracy=hits / n if n else float("nan"), confusion=confusion,
                   predictions=np.concatenate(kept) if kept else None,
                   tta="flip" if flip else "none")


@contextlib.contextmanager
def open_run(run_dir, *, best: bool = False, precision=None, images_from=None,
             data_format: str = "auto"):
    """Rebuild the model of ``run_dir`` from its config.json in a new graph and
    session and restore its latest (with ``best``, best-validation) checkpoint.

    Yields ``(session, tensors, front)``. ``precision`` (None or ``auto``)
    defaults to the run's (fp16 only where a GPU runs it). ``images_from()``,
    when given, returns ``(front, uint8_images)``: a front-end input whose uint8 images become the
    default of the ``images`` placeholder (``front`` is yielded). ``data_format``: the
    graph's layout (``auto``: the fastest here, see precision.resolve_data_format).

    A run trained with ``ema_decay`` restores its averaged weights and batch-norm
    statistics into the model (``graph.restore_variables``), so eval, predict and
    export all use them.
    """
    run_dir = pathlib.Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = TrainConfig.from_dict(saved)
    prefix = checkpoint.require_latest(run_dir, best=best)
    norm = saved["normalization"]
    if precision in (None, "auto"):
        precision = eval_precision(saved.get("resolved_precision", "fp32"))
    g = tf.Graph()
    with g.as_default():
        front = images = labels = None
        if images_from is not None:
            front, images = images_from()
            labels = tf.zeros(tf.shape(images)[:1], tf.int32)
        tensors = attach_model(cfg, norm["mean"], norm["std"], images=images, labels=labels,
                               precision=precision,
                               data_format=resolve_data_format(data_format,
                                                               precision=precision))
        saver = tf1.train.Saver(restore_variables(cfg))
        with tf1.Session(graph=g, config=session_config()) as sess:
            checkpoint.restore(sess, saver, prefix)
            yield sess, tensors, front


def run_split(run_dir, split: str, *, data_dir=None, best: bool = False) -> data.Split:
    """The ``split`` (test, valid, train) of the data ``run_dir`` was trained on, split as
    it was; first checks that the run has the checkpoint that will be read."""
    run_dir = pathlib.Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = TrainConfig.from_dict(saved)
    checkpoint.require_latest(run_dir, best=best)   # before loading the data
    folder = fetch.find_data_dir(data_dir, saved_dir=saved.get("data_dir"), progress=False)
    dataset = data.load_cifar10(folder, valid_size=cfg.valid_size,
                                train_examples=cfg.train_examples, seed=cfg.seed)
    chosen = {"test": dataset.test, "valid": dataset.valid, "train": dataset.train}[split]
    if len(chosen) == 0:
        raise DataError(f"run {run_dir.name} has no {split} split"
                        f"{' (valid-size 0); use --split test' if split == 'valid' else ''}")
    return chosen


def evaluate_run(run_dir, *, split: str = "test", batch_size: int = 500,
                 data_dir=None, best: bool = False, plot_dir=None,
                 precision: str = "auto", flip: bool = False) -> Metrics:
    """Evaluate ``split`` with the latest (with ``best``, best-validation)
    checkpoint of ``run_dir`` (see :func:`open_run`) in ``precision`` (``auto``:
    the run's), with ``flip`` averaged over each image and its mirror; with
    ``plot_dir``, also draw the confusion matrix and example predictions there."""
    run_dir = pathlib.Path(run_dir)
    chosen = run_split(run_dir, split, data_dir=data_dir, best=best)
    with open_run(run_dir, best=best, precision=precision) as (sess, tensors, _):
        metrics = evaluate(sess, tensors, chosen, batch_size=batch_size, name=split,
                           keep_predictions=plot_dir is not None, flip=flip)
    if plot_dir is not None:
        from .plotting import plot_evaluation
        plot_evaluation(metrics.confusion, chosen.images, chosen.labels, metrics.predictions,
                        data.CLASS_NAMES, plot_dir, title=f"{run_dir.name} ({split})")
    return metrics
