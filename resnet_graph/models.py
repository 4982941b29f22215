"""The three networks of the write-up, for depth 6n+2, with one signature.

Every block function takes ``(x, filters, training, strides, data_format,
first, bn, conv, zero_init)`` and returns the block's output, so the networks
differ only in the ``block_fn`` that :func:`build_logits` stacks (as in
TensorFlow's official r1 ResNet). ``bn`` and ``conv`` are keyword arguments of
the batch norms (momentum, epsilon) and convolutions (initialisation, padding
of the strided ones); ``zero_init`` starts the residual branch at zero. Stages have 16, 32 and 64 filters at 32x32, 16x16 and 8x8; the first
block of stages 2 and 3 halves the resolution with stride 2.

=========  =====  ============  ============
 model     depth  convolutions  dense layers
=========  =====  ============  ============
 any       6n+2   6n+1          1
=========  =====  ============  ============

Trainable parameters (measured by ``resnet-graph summary``, shortcut A):
ResNet-20 0.27M, 32 0.46M, 44 0.66M, 56 0.85M, 110 1.7M, as in He et al. 2015;
the same for every ``init``, ``stride_padding`` and ``zero_init_residual``
(they change initial values and padding, not the layers).

``zero_init_residual`` (Goyal et al. 2017) makes every residual branch output
zero at the start where the shortcut carries the block's input, so each block
starts as the identity (original: then the ReLU of the identity): in the
original block the branch's last batch norm (``bn2``) starts with gamma 0. The
pre-activation branch ends in a convolution, not a batch norm: its last batch
norm (``bn2``) feeds ReLU and ``conv2``, and a zero gamma there (with beta 0)
would output exactly 0, where ReLU passes no gradient, so gamma, beta and
``conv2`` would never move and the branch would stay dead. There the branch's
last layer, the kernel of ``conv2``, starts at zero instead (gamma stays 1),
which zeroes the branch as well and still learns.

Only the channels the shortcut carries are zeroed. In the first block of stages
2 and 3 the option-A shortcut pads half of the channels with zeros; a branch
started at zero there would make those channels exactly 0 before the ReLU
(original) or feed a constant 0 into every later batch norm (preact), where no
gradient passes, and they would stay dead for good: a first version did zero
them, and in its trained ResNet-20 48 of the 64 final channels were still 0. Those
channels start as a plain layer would (gamma 1, a drawn kernel). In every other
block the shortcut carries all channels and the whole branch starts at zero.
The plain network has no branches and refuses the option (config.py).
"""

import tensorflow as tf

from . import ops
from .config import canonical_model, check_depth
from .data import NUM_CLASSES

tf1 = tf.compat.v1

STAGE_FILTERS = (16, 32, 64)
# Collection of every 3x3 convolution's response in layer order (resnet_graph.probes):
# for original and plain the output of its batch norm, for preact's blocks the
# convolution's own output (no batch norm follows it before the addition).
RESPONSES = "resnet_graph_responses"


def _respond(y, name):
    """Register ``y`` as the response of convolution ``name``; returns ``y`` unchanged."""
    tf1.add_to_collection(RESPONSES, tf.identity(y, name=f"{name}_response"))
    return y


def _bn(x, training, data_format, name, bn, zero_channels=None):
    return ops.batch_norm(x, training, data_format=data_format, name=name,
                          zero_channels=zero_channels, **bn)


def _conv(x, filters, strides, data_format, name, conv, zero_channels=None):
    return ops.conv2d(x, filters, 3, strides, data_format=data_format, name=name,
                      zero_channels=zero_channels, **conv)


def _carried(x, filters, data_format, zero_init):
    """The output channels to start at zero: those the shortcut carries, or None."""
    if not zero_init:
        return None
    return ops.shortcut_channels(x.shape[ops.channel_axis(data_format)], filters)


def original_block(x, filters, training, strides, data_format, first, bn, conv,
                   zero_init=False):
    """Post-activation block (He et al. 2015): conv-BN-ReLU-conv-BN, add, ReLU.

    ``zero_init``: ``bn2``'s gamma starts at 0 in the channels the shortcut
    carries (see the module docstring)."""
    del first  # the post-activation block looks the same everywhere
    shortcut = ops.shortcut_option_a(x, filters, strides, data_format=data_format)
    y = _conv(x, filters, strides, data_format, "conv1", conv)
    y = tf.nn.relu(_respond(_bn(y, training, data_format, "bn1", bn), "conv1"))
    y = _conv(y, filters, 1, data_format, "conv2", conv)
    y = _respond(_bn(y, training, data_format, "bn2", bn,
                     zero_channels=_carried(x, filters, data_format, zero_init)), "conv2")
    return tf.nn.relu(y + shortcut)


def preact_block(x, filters, training, strides, data_format, first, bn, conv,
                 zero_init=False):
    """Pre-activation block (He et al. 2016): BN-ReLU-conv-BN-ReLU-conv, add.

    The very first block follows the stem's BN-ReLU ("we adopt the first
    activation right after conv1"), so it does not normalise again.
    ``zero_init``: ``conv2``'s kernel starts at 0 for the output channels the
    shortcut carries (see the module docstring).
    """
    shortcut = ops.shortcut_option_a(x, filters, strides, data_format=data_format)
    y = x if first else tf.nn.relu(_bn(x, training, data_format, "bn1", bn))
    y = _conv(y, filters, strides, data_format, "conv1", conv)
    y = tf.nn.relu(_respond(_bn(y, training, data_format, "bn2", bn), "conv1"))
    y = _respond(_conv(y, filters, 1, data_format, "conv2", conv,
                       zero_channels=_carried(x, filters, data_format, zero_init)), "conv2")
    return y + shortcut


def plain_block(x, filters, training, strides, data_format, first, bn, conv,
                zero_init=False):
    """The same two convolutions as the original block, without the shortcut."""
    del first
    if zero_init:
        raise ValueError("the plain block has no residual branch to zero-initialise")
    y = _conv(x, filters, strides, data_format, "conv1", conv)
    y = tf.nn.relu(_respond(_bn(y, training, data_format, "bn1", bn), "conv1"))
    y = _conv(y, filters, 1, data_format, "conv2", conv)
    return tf.nn.relu(_respond(_bn(y, training, data_format, "bn2", bn), "conv2"))


BLOCKS = {"original": original_block, "preact": preact_block, "plain": plain_block}


def build_logits(model, x, training, *, depth=32, data_format="NHWC",
                 bn_momentum=0.9, bn_epsilon=1e-5, init="glorot", stride_padding="same",
                 zero_init_residual=False):
    """Build a network on normalised images ``x`` and return float32 logits [N, 10].

    Args:
      model: ``original``, ``preact`` or ``plain`` (aliases accepted).
      x: images in ``data_format`` and the compute dtype (float32, float16 or
        bfloat16); the whole network computes in that dtype.
      training: Python bool or scalar bool tensor (batch norm mode).
      depth: 6n+2 weighted layers.
      init: ``glorot`` or ``he`` kernels (every convolution and the dense layer).
      stride_padding: ``same`` or ``symmetric`` padding of the stride-2 convolutions.
      zero_init_residual: start every residual branch at zero (module docstring).

    Variables are created under the current variable scope: ``stem``,
    ``stage{1,2,3}/block{k}``, ``final_bn`` (preact only) and ``dense``.
    """
    block_fn = BLOCKS[canonical_model(model)]
    n = (check_depth(depth) - 2) // 6
    bn = dict(momentum=bn_momentum, epsilon=bn_epsilon)
    conv = dict(init=init, stride_padding=stride_padding)
    with tf1.variable_scope("stem"):
        y = _conv(x, STAGE_FILTERS[0], 1, data_format, "conv", conv)
        y = tf.nn.relu(_respond(_bn(y, training, data_format, "bn", bn), "conv"))
    for stage, filters in enumerate(STAGE_FILTERS):
        for k in range(n):
            strides = 2 if stage > 0 and k == 0 else 1
            with tf1.variable_scope(f"stage{stage + 1}/block{k + 1}"):
                y = block_fn(y, filters, training, strides, data_format,
                             stage == 0 and k == 0, bn, conv, zero_init_residual)
    if block_fn is preact_block:
        # He et al. 2016 end with BN-ReLU before pooling; the write-up omits it.
        y = tf.nn.relu(_bn(y, training, data_format, "final_bn", bn))
    features = ops.global_average_pool(y, data_format=data_format)
    return ops.dense(features, NUM_CLASSES, name="dense", init=init)


def layer_counts(graph_or_ops):
    """Count Conv2D and MatMul ops: (convolutions, dense layers)."""
    op_list = graph_or_ops.get_operations() if hasattr(graph_or_ops, "get_operations") else graph_or_ops
    convs = sum(1 for op in op_list if op.type == "Conv2D")
    dense_layers = sum(1 for op in op_list if op.type == "MatMul")
    return convs, dense_layers
