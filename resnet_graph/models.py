"""The three networks of the write-up, for depth 6n+2, with one signature.

Every block function takes ``(x, filters, training, strides, data_format,
first)`` and returns the block's output, so the networks differ only in the
``block_fn`` that :func:`build_logits` stacks (as in TensorFlow's official r1
ResNet). Stages have 16, 32 and 64 filters at 32x32, 16x16 and 8x8; the first
block of stages 2 and 3 halves the resolution with stride 2.

=========  =====  ============  ============
 model     depth  convolutions  dense layers
=========  =====  ============  ============
 any       6n+2   6n+1          1
=========  =====  ============  ============

Trainable parameters (measured by ``resnet-graph summary``, shortcut A):
ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M, as in He et al. 2015.
"""

import tensorflow as tf

from . import ops
from .config import canonical_model, check_depth

tf1 = tf.compat.v1

STAGE_FILTERS = (16, 32, 64)
NUM_CLASSES = 10


def _bn(x, training, data_format, name, bn):
    return ops.batch_norm(x, training, data_format=data_format, name=name, **bn)


def original_block(x, filters, training, strides, data_format, first, bn):
    """Post-activation block (He et al. 2015): conv-BN-ReLU-conv-BN, add, ReLU."""
    del first  # the post-activation block looks the same everywhere
    shortcut = ops.shortcut_option_a(x, filters, strides, data_format=data_format)
    y = ops.conv2d(x, filters, 3, strides, data_format=data_format, name="conv1")
    y = tf.nn.relu(_bn(y, training, data_format, "bn1", bn))
    y = ops.conv2d(y, filters, 3, 1, data_format=data_format, name="conv2")
    y = _bn(y, training, data_format, "bn2", bn)
    return tf.nn.relu(y + shortcut)


def preact_block(x, filters, training, strides, data_format, first, bn):
    """Pre-activation block (He et al. 2016): BN-ReLU-conv-BN-ReLU-conv, add.

    The very first block follows the stem's BN-ReLU ("we adopt the first
    activation right after conv1"), so it does not normalise again.
    """
    shortcut = ops.shortcut_option_a(x, filters, strides, data_format=data_format)
    y = x if first else tf.nn.relu(_bn(x, training, data_format, "bn1", bn))
    y = ops.conv2d(y, filters, 3, strides, data_format=data_format, name="conv1")
    y = tf.nn.relu(_bn(y, training, data_format, "bn2", bn))
    y = ops.conv2d(y, filters, 3, 1, data_format=data_format, name="conv2")
    return y + shortcut


def plain_block(x, filters, training, strides, data_format, first, bn):
    """The same two convolutions as the original block, without the shortcut."""
    del first
    y = ops.conv2d(x, filters, 3, strides, data_format=data_format, name="conv1")
    y = tf.nn.relu(_bn(y, training, data_format, "bn1", bn))
    y = ops.conv2d(y, filters, 3, 1, data_format=data_format, name="conv2")
    return tf.nn.relu(_bn(y, training, data_format, "bn2", bn))


BLOCKS = {"original": original_block, "preact": preact_block, "plain": plain_block}


def build_logits(model, x, training, *, depth=32, data_format="NHWC",
                 bn_momentum=0.9, bn_epsilon=1e-5):
    """Build a network on normalised images ``x`` and return float32 logits [N, 10].

    Args:
      model: ``original``, ``preact`` or ``plain`` (aliases accepted).
      x: images in ``data_format`` and the compute dtype (float32, float16 or
        bfloat16); the whole network computes in that dtype.
      training: Python bool or scalar bool tensor (batch norm mode).
      depth: 6n+2 weighted layers.

    Variables are created under the current variable scope: ``stem``,
    ``stage{1,2,3}/block{k}``, ``final_bn`` (preact only) and ``dense``.
    """
    block_fn = BLOCKS[canonical_model(model)]
    n = (check_depth(depth) - 2) // 6
    bn = dict(momentum=bn_momentum, epsilon=bn_epsilon)
    with tf1.variable_scope("stem"):
        y = ops.conv2d(x, STAGE_FILTERS[0], 3, 1, data_format=data_format, name="conv")
        y = tf.nn.relu(_bn(y, training, data_format, "bn", bn))
    for stage, filters in enumerate(STAGE_FILTERS):
        for k in range(n):
            strides = 2 if stage > 0 and k == 0 else 1
            with tf1.variable_scope(f"stage{stage + 1}/block{k + 1}"):
                y = block_fn(y, filters, training, strides, data_format,
                             stage == 0 and k == 0, bn)
    if block_fn is preact_block:
        # He et al. 2016 end with BN-ReLU before pooling; the write-up omits it.
        y = tf.nn.relu(_bn(y, training, data_format, "final_bn", bn))
    features = ops.global_average_pool(y, data_format=data_format)
    return ops.dense(features, NUM_CLASSES, name="dense")


def layer_counts(graph_or_ops):
    """Count Conv2D and MatMul ops: (convolutions, dense layers)."""
    op_list = graph_or_ops.get_operations() if hasattr(graph_or_ops, "get_operations") else graph_or_ops
    convs = sum(1 for op in op_list if op.type == "Conv2D")
    dense_layers = sum(1 for op in op_list if op.type == "MatMul")
    return convs, dense_layers
