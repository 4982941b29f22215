"""Layers in the ``tf.layers`` style, written from ``tf.compat.v1`` core ops.

``tf.compat.v1.layers`` needs Keras 2 and raises under Keras 3, so each layer
here creates its variables with ``get_variable`` inside a ``variable_scope``
(calling again under a reusing scope shares them) and applies plain ``tf.nn``
ops. Conventions shared by every layer:

* Variables are float32 ("master weights"); a layer casts its kernel to the
  dtype of its input, so a float16 or bfloat16 graph computes in that dtype
  while the optimizer updates float32 values.
* ``data_format`` is ``"NHWC"`` or ``"NCHW"`` and is threaded through every op.
* ``training`` is a Python bool (the branch is chosen while building) or a
  scalar bool tensor (chosen at run time with ``tf.cond``).
"""

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1


def channel_axis(data_format: str) -> int:
    return 3 if data_format == "NHWC" else 1


def spatial_axes(data_format: str):
    return (1, 2) if data_format == "NHWC" else (2, 3)


def kernel_initializer(init: str = "glorot"):
    """``glorot``: Glorot-uniform (limit sqrt(6 / (fan_in + fan_out))); ``he``: the
    normal distribution of He et al. 2015b, mean 0 and variance 2 / fan_in
    (untruncated, as the paper draws it). fan_in is k * k * in_channels for a
    convolution and the input width for a dense layer."""
    if init == "glorot":
        return tf1.glorot_uniform_initializer()
    if init == "he":
        return tf1.variance_scaling_initializer(scale=2.0, mode="fan_in",
                                                distribution="untruncated_normal")
    raise ValueError(f"init must be glorot or he, got {init!r}")


def zeroing_channels(initializer, channels: int, zero_channels):
    """``initializer`` with the output channels (last axis) ``lo <= c < hi`` of
    ``zero_channels = (lo, hi)`` starting at zero; unchanged for None, and plain
    zeros when the range is every channel."""
    if zero_channels is None:
        return initializer
    lo, hi = zero_channels
    if not 0 <= lo <= hi <= channels:
        raise ValueError(f"zero_channels {zero_channels} outside 0..{channels}")
    if (lo, hi) == (0, channels):
        return tf1.zeros_initializer()
    mask = np.ones(channels, np.float32)
    mask[lo:hi] = 0.0

    def init(shape, dtype=tf.float32, partition_info=None):
        value = initializer(shape, dtype=dtype, partition_info=partition_info)
        return value * tf.constant(mask, dtype)
    return init


def conv2d(x, filters, kernel_size=3, strides=1, *, data_format, name, init="glorot",
           stride_padding="same", zero_channels=None):
    """Convolution without bias; kernel from :func:`kernel_initializer`, with
    the output channels of ``zero_channels = (lo, hi)`` starting at zero.

    Stride 1 uses 'SAME' padding ((k - 1) / 2 on every side). A strided
    convolution depends on ``stride_padding``: ``same`` is TensorFlow's 'SAME',
    which for k = 3, stride 2 and an even input pads 0 rows on top and 1 at the
    bottom (0 columns left, 1 right), so output pixel i is centred on input
    pixel 2i + 1; ``symmetric`` pads (k - 1) / 2 on every side explicitly and
    runs 'VALID' (Caffe, Torch, TensorFlow's official ResNet), so output pixel i
    is centred on input pixel 2i, the one the option-A shortcut keeps.

    There is no bias because every convolution here feeds a batch norm, whose
    offset makes a bias redundant.
    """
    in_channels = x.shape[channel_axis(data_format)]
    initializer = zeroing_channels(kernel_initializer(init), filters, zero_channels)
    with tf1.variable_scope(name):
        kernel = tf1.get_variable(
            "kernel", [kernel_size, kernel_size, in_channels, filters], tf.float32,
            initializer=initializer)
        padding = "SAME"
        if strides > 1 and stride_padding == "symmetric":
            before = (kernel_size - 1) // 2
            after = kernel_size - 1 - before
            pad = [[0, 0]] * 4
            for axis in spatial_axes(data_format):
                pad[axis] = [before, after]
            x = tf.pad(x, pad)
            padding = "VALID"
        elif stride_padding not in ("same", "symmetric"):
            raise ValueError(f"stride_padding must be same or symmetric, got {stride_padding!r}")
        return tf.nn.conv2d(x, tf.cast(kernel, x.dtype), strides=strides,
                            padding=padding, data_format=data_format)


def batch_norm(x, training, *, data_format, name, momentum=0.9, epsilon=1e-5,
               zero_channels=None):
    """Fused batch normalisation with moving averages.

    While training it normalises with the batch's statistics and records two
    pending updates that move ``moving_mean``/``moving_variance`` towards them
    (``decay = momentum``) in the :data:`STATISTICS_UPDATES` collection; the
    training graph turns them into assignments in ``tf.GraphKeys.UPDATE_OPS``
    (:func:`moving_statistics_updates`) that its train op depends on (see
    ``graph.py``). Otherwise it normalises with the moving
    averages, so an image's output does not depend on the rest of its batch.
    Scale, offset and statistics stay float32 whatever the input dtype.
    ``zero_channels = (lo, hi)`` starts the scale of those channels at 0
    instead of 1 (Goyal et al. 2017).
    """
    channels = x.shape[channel_axis(data_format)]
    with tf1.variable_scope(name):
        gamma = tf1.get_variable(
            "gamma", [channels], tf.float32,
            zeroing_channels(tf1.ones_initializer(), channels, zero_channels))
        beta = tf1.get_variable("beta", [channels], tf.float32, tf1.zeros_initializer())
        stat_collections = [tf1.GraphKeys.GLOBAL_VARIABLES, tf1.GraphKeys.MOVING_AVERAGE_VARIABLES]
        moving_mean = tf1.get_variable(
            "moving_mean", [channels], tf.float32, tf1.zeros_initializer(),
            trainable=False, collections=stat_collections)
        moving_var = tf1.get_variable(
            "moving_variance", [channels], tf.float32, tf1.ones_initializer(),
            trainable=False, collections=stat_collections)

        def batch_stats():
            y, mean, var = tf1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=epsilon, data_format=data_format, is_training=True)[:3]
            return y, mean, var

        def moving_stats():
            y = tf1.nn.fused_batch_norm(
                x, gamma, beta, mean=moving_mean, variance=moving_var, epsilon=epsilon,
                data_format=data_format, is_training=False)[0]
            return y, moving_mean.read_value(), moving_var.read_value()

        if isinstance(training, bool):
            y, mean, var = batch_stats() if training else moving_stats()
            if not training:
                return y
        else:
            y, mean, var = tf.cond(training, batch_stats, moving_stats)
        # In inference mode (tensor flag False) mean/var *are* the moving
        # values, so these updates are exact no-ops; they only run with the
        # train op anyway.
        rate = 1.0 - momentum
        tf1.add_to_collection(STATISTICS_UPDATES,
                              StatisticUpdate(moving_mean, (moving_mean - mean) * rate))
        tf1.add_to_collection(STATISTICS_UPDATES,
                              StatisticUpdate(moving_var, (moving_var - var) * rate))
        return y


# Graph collection of the pending moving-statistics updates of batch_norm.
STATISTICS_UPDATES = "resnet_graph_statistics_updates"


class StatisticUpdate:
    """A pending ``variable -= delta`` of a batch-norm moving statistic.

    ``batch_norm`` records these instead of creating the assignments itself,
    because whether (and with which delta) they run is decided by the train
    op: with fp16 loss scaling only on steps whose gradients are finite, and
    across processes with the delta averaged over every process. ``name``
    lets ``get_collection(..., scope=...)`` filter them like ops.
    """

    def __init__(self, variable, delta):
        self.variable = variable
        self.delta = delta
        self.name = delta.name


def moving_statistics_updates(updates, deltas=None, gate=None):
    """Create the assignments of ``updates`` (StatisticUpdate) and add them to
    ``tf.GraphKeys.UPDATE_OPS``; returns them.

    ``deltas`` replaces each update's own delta (e.g. averaged across
    processes); with a bool scalar ``gate`` an update moves its variable only
    where the gate is true (an fp16 step that loss scaling skips leaves the
    statistics exactly as they were, even if its batch statistics were inf/NaN).
    """
    deltas = [u.delta for u in updates] if deltas is None else deltas
    ops_ = []
    for update, delta in zip(updates, deltas):
        # In the batch norm's name scope, so that scoped collections find it.
        with tf1.name_scope(update.delta.op.name.rpartition("/")[0] + "/"):
            if gate is not None:
                delta = tf.where(gate, delta, tf.zeros_like(delta))
            op = update.variable.assign_sub(delta)
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, op)
        ops_.append(op)
    return ops_


def dense(x, units, *, name, init="glorot"):
    """Fully connected layer with a :func:`kernel_initializer` kernel and zero bias."""
    with tf1.variable_scope(name):
        kernel = tf1.get_variable("kernel", [x.shape[-1], units], tf.float32,
                                  initializer=kernel_initializer(init))
        bias = tf1.get_variable("bias", [units], tf.float32, tf1.zeros_initializer())
        return tf.nn.bias_add(tf.matmul(x, tf.cast(kernel, x.dtype)), tf.cast(bias, x.dtype))


def shortcut_option_a(x, filters, strides, *, data_format):
    """The paper's parameter-free "option A" shortcut.

    Keeps every ``strides``-th pixel (a strided slice, no pooling op) and pads
    the channels with zeros, half before and half after, up to ``filters``.
    """
    if strides > 1:
        if data_format == "NHWC":
            x = x[:, ::strides, ::strides, :]
        else:
            x = x[:, :, ::strides, ::strides]
    in_channels = x.shape[channel_axis(data_format)]
    lo, hi = shortcut_channels(in_channels, filters)
    if (lo, hi) != (0, filters):
        pad = [[0, 0]] * 4
        pad[channel_axis(data_format)] = [lo, filters - hi]
        x = tf.pad(x, pad)
    return x


def shortcut_channels(in_channels: int, filters: int) -> tuple:
    """(lo, hi): the output channels ``lo <= c < hi`` of :func:`shortcut_option_a`
    that carry its input; the others are the zero padding."""
    extra = filters - in_channels
    if extra < 0:
        raise ValueError(f"option A cannot shrink {in_channels} channels to {filters}")
    return extra // 2, extra // 2 + in_channels


def global_average_pool(x, *, data_format):
    """Mean over the spatial axes, computed in float32: [N, C]."""
    return tf.reduce_mean(tf.cast(x, tf.float32), axis=spatial_axes(data_format))
