"""Precision and layout policy: what ``auto`` means here, whether this machine can
train a choice, the compute dtypes, and dynamic loss scaling (fp16).

Variables are always float32 (master weights); the compute dtype is the
input's (see ``graph.attach_model`` and ops.py). With fp16 the loss is
multiplied by a dynamic scale before differentiation and the gradients are
divided by it; a step whose gradients (or batch statistics) hold inf/NaN is
skipped and halves the scale, ``LOSS_SCALE_GROWTH_STEPS`` applied steps in a
row double it, up to ``MAX_LOSS_SCALE``. A skipped step applies nothing, so
``global_step`` counts applied updates and the position in the run is the
number of steps *taken* (:func:`steps_taken`).
"""

import contextlib
import dataclasses
import functools
from typing import Optional

import tensorflow as tf

from .errors import UserError
from .runtime import (
    cpu_has_bf16,
    error_reason,
    gpu_count,
    onednn_enabled,
    session_config,
    stderr_silenced,
)

tf1 = tf.compat.v1

COMPUTE_DTYPES = {"fp32": tf.float32, "fp16": tf.float16, "bf16": tf.bfloat16}

# Dynamic loss scaling (fp16): start high, halve on overflow, double after
# this many finite steps in a row, never above the cap. The values are the
# usual ones (Micikevicius et al. 2018; TensorFlow's DynamicLossScale).
INITIAL_LOSS_SCALE = 2.0 ** 15
MAX_LOSS_SCALE = 2.0 ** 24
LOSS_SCALE_GROWTH_STEPS = 2000
LOSS_SCALE_BACKOFF = 2.0   # a skipped step divides the scale by this (not below 1)


def gpu_available() -> bool:
    return gpu_count() > 0


def resolve_precision(precision: str, gpu: Optional[bool] = None,
                      bf16_units: Optional[bool] = None,
                      onednn: Optional[bool] = None) -> str:
    """``auto``: fp16 (with loss scaling) on a GPU; on a CPU, bf16 where it has
    bfloat16 units (AVX512_BF16 or AMX) *and* TensorFlow runs oneDNN, else fp32.

    With oneDNN, bf16 trains ResNet-32 1.4-1.8x faster than fp32 on both CPUs
    measured, and the whole ``fast`` recipe (30 epochs, same seed) ended 0.32
    points of validation accuracy below fp32 and 0.09 above it on the test set
    (docs/results.md). Without oneDNN, TensorFlow's Eigen kernels emulate
    bfloat16 and bf16 trained 14 img/s against fp32's 125 on the EPYC with
    bf16 units (docs/performance.md), so it is never picked there.
    ``gpu``/``bf16_units``/``onednn`` default to what this machine has.
    """
    if precision != "auto":
        return precision
    if gpu_available() if gpu is None else gpu:
        return "fp16"
    if bf16_units is None:
        bf16_units = cpu_has_bf16()
    if onednn is None:
        onednn = onednn_enabled()
    return "bf16" if bf16_units and onednn else "fp32"


def resolve_data_format(data_format: str, gpu: Optional[bool] = None,
                        precision: str = "fp32") -> str:
    """``auto``: NHWC on a CPU (oneDNN ran NCHW 3x slower here); on a GPU, NCHW
    for fp32 (cuDNN's classic layout) and NHWC for fp16 (tensor-core kernels
    are NHWC). The GPU choices follow NVIDIA's guidance and await measurement
    by bench/gpu_check.sh."""
    if data_format != "auto":
        return data_format
    if not (gpu_available() if gpu is None else gpu):
        return "NHWC"
    return "NHWC" if precision == "fp16" else "NCHW"


def eval_precision(saved: str) -> str:
    """Precision to evaluate a run trained in ``saved``: fp16 only where a GPU runs it."""
    if saved == "fp16" and not gpu_available():
        return "fp32"
    return saved if saved in ("fp32", "fp16", "bf16") else "fp32"


@functools.lru_cache(maxsize=None)
def kernel_problem(data_format: str, precision: str, xla: bool = False) -> Optional[str]:
    """Why this machine's TensorFlow cannot train in ``data_format``/``precision``
    (with XLA if ``xla``), or None when it can.

    Runs one tiny training step of the ops the models use (a convolution, fused
    batch norm, their gradients) on the default device in a throwaway graph: a
    build decides its kernels (e.g. without oneDNN the CPU has no NCHW
    convolution), so asking it is the only reliable test. NHWC float32 without
    XLA always runs and is not probed.
    """
    if (data_format, precision, xla) == ("NHWC", "fp32", False):
        return None
    dtype = COMPUTE_DTYPES[precision]
    shape = [2, 8, 8, 4] if data_format == "NHWC" else [2, 4, 8, 8]
    g = tf.Graph()
    with g.as_default():
        scope = tf.xla.experimental.jit_scope() if xla else contextlib.nullcontext()
        with scope:
            x = tf.cast(tf.random.stateless_normal(shape, seed=[0, 0]), dtype)
            kernel = tf1.get_variable("k", [3, 3, 4, 4], tf.float32)
            y = tf.nn.conv2d(x, tf.cast(kernel, dtype), strides=2, padding="SAME",
                             data_format=data_format)
            y = tf1.nn.fused_batch_norm(y, tf.ones([4]), tf.zeros([4]), data_format=data_format,
                                        is_training=True)[0]
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            grads = tf.gradients(loss, [kernel, x])
        init = tf1.global_variables_initializer()
    try:
        # The process's session options (runtime.session_config): on a GPU the first
        # session creates the allocator, so a probe without them would map all its memory.
        with stderr_silenced(), tf1.Session(graph=g, config=session_config()) as sess:
            sess.run(init)
            sess.run(grads)
    except (tf.errors.OpError, ValueError, TypeError) as e:
        return error_reason(e)
    return None


def check_runnable(precision: str, data_format: str, xla: bool) -> None:
    """Refuse, before anything is built or written, a resolved precision, layout
    and XLA setting that this machine's TensorFlow cannot train, with one line
    that names the reason and the alternative (``auto`` never picks one)."""
    problem = kernel_problem(data_format, precision, xla)
    if problem is None:
        return
    if xla and kernel_problem(data_format, precision, False) is None:
        hint = "drop --xla"
    elif data_format != "NHWC" and kernel_problem("NHWC", precision, xla) is None:
        hint = "use --data-format NHWC (or auto)"
        if not gpu_available() and not onednn_enabled():
            hint += ", or let oneDNN's NCHW kernels run (unset TF_ENABLE_ONEDNN_OPTS)"
    elif precision != "fp32" and kernel_problem(data_format, "fp32", xla) is None:
        hint = "use --precision fp32 (or auto)"
    else:
        hint = "use --data-format auto --precision auto --no-xla"
    device = "GPU" if gpu_available() else "CPU"
    raise UserError(f"--data-format {data_format} --precision {precision}"
                    f"{' --xla' if xla else ''} cannot train on this {device} with this "
                    f"TensorFlow ({problem}); {hint}")


@dataclasses.dataclass
class LossScaling:
    """The checkpointed state of dynamic loss scaling (fp16)."""

    scale: tf1.Variable          # float32: the loss is multiplied by it
    good_steps: tf1.Variable     # int64: finite steps since the scale last changed
    skipped_steps: tf1.Variable  # int64: steps skipped for non-finite gradients, ever


def loss_scaling_state() -> LossScaling:
    """Create the loss-scaling variables (scope ``loss_scaling``).

    Why not TensorFlow's ``tf.compat.v1.mixed_precision.MixedPrecisionLossScaleOptimizer``
    (which needs no Keras): its finiteness decision stays inside its
    ``apply_gradients``, so the batch-norm statistics cannot be made to move on
    applied steps only; it keeps no count of skipped steps, which the position
    in the epoch needs (see the module docstring); its ``DynamicLossScale`` has
    no upper bound; and both are deprecated v1 APIs. The rule below is theirs.
    """
    with tf1.variable_scope("loss_scaling"):
        return LossScaling(
            scale=tf1.get_variable("scale", [], tf.float32,
                                   tf1.constant_initializer(INITIAL_LOSS_SCALE), trainable=False),
            good_steps=tf1.get_variable("good_steps", [], tf.int64, tf1.zeros_initializer(),
                                        trainable=False),
            skipped_steps=tf1.get_variable("skipped_steps", [], tf.int64,
                                           tf1.zeros_initializer(), trainable=False))


def steps_taken(global_step, scaling: Optional[LossScaling]):
    """Training steps taken so far, applied or skipped (see the module docstring)."""
    if scaling is None:
        return global_step     # no extra op: the graph of fp32/bf16 runs is unchanged
    return tf.add(tf.cast(global_step, tf.int64), scaling.skipped_steps, name="steps_taken")


def all_finite(tensors):
    """One bool: every element of every tensor is finite.

    One check over all of them together (their elements in one float32 vector:
    a reshape each, which copies nothing, one concatenation, one ``IsFinite``
    and one ``All``) instead of a pair of kernels per tensor: a step of
    ResNet-32 checks 157 gradients and statistics deltas, and on a GPU every
    kernel launch costs about as much as a small one's work."""
    flat = [tf.reshape(x if x.dtype == tf.float32 else tf.cast(x, tf.float32), [-1])
            for x in map(tf.convert_to_tensor, tensors)]
    return tf.reduce_all(tf.math.is_finite(tf.concat(flat, 0)))


def guarded_update(scaling: LossScaling, finite, apply_update):
    """The op of one loss-scaled step: if ``finite``, ``apply_update()`` (the
    optimizer's update) and then count a good step, doubling the scale after
    ``LOSS_SCALE_GROWTH_STEPS`` of them (up to ``MAX_LOSS_SCALE``); else skip:
    nothing is applied, the scale halves (not below 1) and ``skipped_steps`` grows."""
    scale, good, skipped = scaling.scale, scaling.good_steps, scaling.skipped_steps

    def apply():
        update = apply_update()
        with tf.control_dependencies([update]):
            grow = good + 1 >= LOSS_SCALE_GROWTH_STEPS
            return tf.group(
                scale.assign(tf.where(grow, tf.minimum(scale * 2.0, MAX_LOSS_SCALE), scale)),
                good.assign(tf.where(grow, tf.zeros_like(good), good + 1)))

    def skip():
        return tf.group(scale.assign(tf.maximum(scale / LOSS_SCALE_BACKOFF, 1.0)),
                        good.assign(tf.zeros_like(good)), skipped.assign_add(1))

    return tf.cond(finite, apply, skip)
