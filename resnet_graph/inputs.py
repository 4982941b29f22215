"""The training input inside the graph: the training set as local variables, each
epoch's order, one global batch (or this process's rows of it), its augmentation
and the normalisation of pixels.

Training data lives in the graph as local (never checkpointed) variables,
loaded once per run: a step only feeds the index of its batch, and the batch,
its augmentation and its normalisation are computed by TensorFlow. The order
of epoch e is a function of (seed, e) alone (:func:`epoch_order`), and the
augmentation of a step a function of (seed, steps taken), so a resumed run
sees exactly the batches and augmentation of an uninterrupted one.
"""

import dataclasses
from typing import Optional

import numpy as np
import tensorflow as tf

from .config import TrainConfig

tf1 = tf.compat.v1


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch`` (1-based): a function of seed and epoch only,
    so a resumed run visits the images in the same order as an uninterrupted one."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def normalise(images, mean, std, data_format, dtype):
    """uint8 NHWC pixels -> (x - mean) / std in ``data_format`` and ``dtype``."""
    x = (tf.cast(images, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    if data_format == "NCHW":
        x = tf.transpose(x, [0, 3, 1, 2])
    return tf.cast(x, dtype)


def augment(images, seed, pad=4, *, offset=0, total=None):
    """Pad by ``pad`` zero pixels, crop a random 32x32 window, flip half.

    Each image gets its own offsets and flip, drawn by stateless ops from
    ``seed`` (int [2]), so a resumed run sees exactly the same augmentation.
    The crop and the flip are one pair of batched gathers. ``images`` may be
    rows ``offset:`` of a batch of ``total`` (one worker's share of the global
    batch): the draws are made for the whole batch and sliced, so every image
    is augmented as it would be in a single process.
    """
    size = images.shape[1]
    batch = tf.shape(images)[0]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    if total is None:
        u = tf.random.stateless_uniform([batch, 3], seed=seed)
    else:
        u = tf.random.stateless_uniform([total, 3], seed=seed)[offset:offset + batch]
    offsets = tf.cast(tf.floor(u[:, :2] * (2 * pad + 1)), tf.int32)
    flip = u[:, 2] < 0.5
    span = tf.range(size, dtype=tf.int32)
    rows = offsets[:, :1] + span
    cols = tf.where(flip[:, None], offsets[:, 1:] + (size - 1) - span, offsets[:, 1:] + span)
    out = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(out, cols, axis=2, batch_dims=1)


@dataclasses.dataclass
class TrainInput:
    """The in-graph training set and this process's share of one global batch."""

    data_images: tf.Tensor      # uint8 [n, 32, 32, 3] placeholder, fed once per run
    data_labels: tf.Tensor
    images_var: tf1.Variable    # local variables holding the training set
    labels_var: tf1.Variable
    order: tf1.Variable         # this epoch's permutation of 0..n-1
    permutation: tf.Tensor      # placeholder that sets ``order``
    batch_index: tf.Tensor      # which global batch of the epoch
    batch_images: tf.Tensor     # this process's rows of it, augmented if asked
    batch_labels: tf.Tensor


def training_input(cfg: TrainConfig, num_train: int, steps, *, rank: int = 0,
                    per_process: Optional[int] = None) -> TrainInput:
    """The training set as local variables and batch ``batch_index`` drawn from it.

    Process ``rank`` takes rows ``rank*per_process`` onwards of each global batch
    (all of it in a single process); augmentation is drawn for the global batch,
    seeded by ``cfg.seed`` and ``steps`` (the steps taken so far).
    """
    per_process = per_process or cfg.batch_size
    with tf1.variable_scope("input"):
        data_images = tf1.placeholder(tf.uint8, [num_train, 32, 32, 3], name="data_images")
        data_labels = tf1.placeholder(tf.int32, [num_train], name="data_labels")
        local = [tf1.GraphKeys.LOCAL_VARIABLES]
        images_var = tf1.Variable(data_images, trainable=False, collections=local,
                                  name="train_images")
        labels_var = tf1.Variable(data_labels, trainable=False, collections=local,
                                  name="train_labels")
        permutation = tf1.placeholder(tf.int32, [num_train], name="permutation")
        order = tf1.Variable(tf.range(num_train, dtype=tf.int32), trainable=False,
                             collections=local, name="order")
        batch_index = tf1.placeholder_with_default(0, [], name="batch_index")
        start = batch_index * cfg.batch_size
        if rank:
            start += rank * per_process
        idx = order[start:start + per_process]
        batch_images = tf.gather(images_var, idx)
        batch_labels = tf.gather(labels_var, idx)
        if cfg.augment:
            seed = tf.stack([tf.constant(cfg.seed, tf.int64), tf.cast(steps, tf.int64)])
            sharded = per_process != cfg.batch_size
            batch_images = augment(batch_images, seed, offset=rank * per_process,
                                   total=cfg.batch_size if sharded else None)
    return TrainInput(data_images, data_labels, images_var, labels_var, order, permutation,
                       batch_index, batch_images, batch_labels)
