"""Attach a model to a ``tf.Graph``: inputs, loss, metrics, optimizer, precision.

:func:`build_train_graph` makes everything one training run needs; it is the
one place where batch-norm updates are tied to the train op. The graph's
public tensors have names, so anything can fetch them by name as well:

============================  ==================================================
name                          what
============================  ==================================================
``images:0``                  uint8 [N, 32, 32, 3] pixels (placeholder with the
                              in-graph training batch as default)
``labels:0``                  int32 [N] classes (same)
``training:0``                bool scalar, defaults to False (inference mode)
``logits:0``                  float32 [N, 10]
``probabilities:0``           softmax of the logits
``predictions:0``             int32 [N] argmax
``example_loss:0``            float32 [N] cross-entropy per image
``loss:0``                    mean cross-entropy of the batch
``total_loss:0``              ``loss`` (label-smoothed if asked) + weight decay:
                              what is minimised
``correct:0``                 float32 [N], 1 where the prediction is right
``accuracy:0``                mean of ``correct``
``learning_rate:0``           the rate of the current step
``steps_taken:0``             (fp16) training steps taken, applied or skipped
============================  ==================================================

Steps and positions: ``global_step`` counts the updates that were applied.
With fp16 loss scaling a step whose gradients overflow is skipped (nothing
is applied, ``global_step`` stays), so the position in the epoch, the
learning-rate schedule and the augmentation seed come from the number of
steps *taken*: ``global_step + loss_scaling/skipped_steps`` (``steps_taken``;
without loss scaling it is ``global_step`` itself). A run resumed after any
number of skips continues with the batch, the rate and the augmentation an
uninterrupted run would have used.

With ``cfg.ema_decay`` the train op also updates an exponential moving average
of the weights (:func:`average_weights`), and evaluation during training runs
a second copy of the network that reads the averages
(``TrainTensors.evaluation``, names under ``averaged/``); ``eval``, ``predict``
and ``export`` restore the averages into the model (:func:`restore_variables`).

Training data lives in the graph as local (never checkpointed) variables,
loaded once per run: a step only feeds the index of its batch, and the batch,
its augmentation and its normalisation are computed by TensorFlow.
"""

import contextlib
import dataclasses
import os
from typing import Optional

import tensorflow as tf

from . import models, ops
from .config import TrainConfig
from .errors import UserError
from .runtime import cpu_has_bf16, gpu_count, kernel_problem, onednn_enabled

tf1 = tf.compat.v1

MODEL_SCOPE = "model"
COMPUTE_DTYPES = {"fp32": tf.float32, "fp16": tf.float16, "bf16": tf.bfloat16}
# Dynamic loss scaling (fp16): start high, halve on overflow, double after
# this many finite steps in a row, never above the cap. The values are the
# usual ones (Micikevicius et al. 2018; TensorFlow's DynamicLossScale).
INITIAL_LOSS_SCALE = 2.0 ** 15
MAX_LOSS_SCALE = 2.0 ** 24
LOSS_SCALE_GROWTH_STEPS = 2000
# The weight average's name: the shadow of variable v is "<v.op.name>/<EMA_NAME>"
# in the checkpoint (TensorFlow's default name).
EMA_NAME = "ExponentialMovingAverage"
AVERAGED_SCOPE = "averaged"


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


def learning_rate(cfg: TrainConfig, global_step, steps_per_epoch: int = 1):
    """The schedule as a function of the optimizer step (see TrainConfig)."""
    if cfg.lr_schedule == "step" and cfg.lr_boundaries:
        values = [cfg.lr * cfg.lr_decay ** i for i in range(len(cfg.lr_boundaries) + 1)]
        lr = tf1.train.piecewise_constant(global_step, list(cfg.lr_boundaries), values)
    elif cfg.lr_schedule == "cosine":
        lr = cosine_with_warmup(cfg.lr, global_step, cfg.epochs * steps_per_epoch,
                                min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch)
    else:
        lr = tf.constant(cfg.lr, tf.float32)
    return tf.identity(tf.cast(lr, tf.float32), name="learning_rate")


def cosine_with_warmup(peak: float, global_step, total_steps: int, warmup_steps: float):
    """Rise linearly to ``peak`` over ``warmup_steps`` (step s trains at
    peak * (s + 1) / warmup), then fall along a half cosine to 0 at ``total_steps``."""
    step = tf.cast(global_step, tf.float32)
    warmup = float(warmup_steps)
    decay_steps = max(float(total_steps) - warmup, 1.0)
    progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + tf.cos(3.141592653589793 * progress))
    if warmup <= 0:
        return cosine
    return tf.where(step < warmup, peak * (step + 1.0) / warmup, cosine)


def make_optimizer(cfg: TrainConfig, lr):
    if cfg.optimizer == "adam":
        return tf1.train.AdamOptimizer(lr, epsilon=cfg.adam_epsilon)
    return tf1.train.MomentumOptimizer(lr, cfg.momentum, use_nesterov=cfg.nesterov)


@dataclasses.dataclass
class ModelTensors:
    """Inputs and outputs of a model attached to a graph."""

    graph: tf.Graph
    images: tf.Tensor
    labels: tf.Tensor
    training: tf.Tensor
    logits: tf.Tensor
    probabilities: tf.Tensor
    predictions: tf.Tensor
    example_loss: tf.Tensor
    loss: tf.Tensor
    correct: tf.Tensor
    accuracy: tf.Tensor
    precision: str
    data_format: str


@dataclasses.dataclass
class TrainTensors(ModelTensors):
    """A :class:`ModelTensors` plus everything a training loop runs."""

    total_loss: tf.Tensor = None
    learning_rate: tf.Tensor = None
    step_loss: tf.Tensor = None        # loss/accuracy of the whole global batch of a step
    step_accuracy: tf.Tensor = None    # (= loss/accuracy with one device and one process)
    train_op: tf.Operation = None
    global_step: tf.Variable = None    # updates applied
    steps_taken: tf.Tensor = None      # steps taken, applied or skipped (= global_step
    #                                    without loss scaling): the position in the run
    epochs_done: tf.Variable = None
    set_epochs_done: tf.Operation = None
    epoch_placeholder: tf.Tensor = None
    epoch_progress: tf.Variable = None   # float64 [3]: loss sum, accuracy sum, seconds
    progress_placeholder: tf.Tensor = None
    set_epoch_progress: tf.Operation = None
    batch_index: tf.Tensor = None
    data_images: tf.Tensor = None      # placeholders that load the training set
    data_labels: tf.Tensor = None
    load_data: tf.Operation = None
    permutation: tf.Tensor = None      # placeholder for one epoch's order
    set_permutation: tf.Operation = None
    loss_scale: Optional[tf.Variable] = None
    skipped_steps: Optional[tf.Variable] = None
    ema: Optional[tf1.train.ExponentialMovingAverage] = None   # --ema-decay runs
    averaged: Optional[ModelTensors] = None   # the network on the averaged weights

    @property
    def evaluation(self) -> ModelTensors:
        """What validation and test evaluate: the averaged weights of an EMA run,
        else the model as it trains."""
        return self.averaged if self.averaged is not None else self


def attach_model(cfg: TrainConfig, mean, std, *, images=None, labels=None,
                 precision="fp32", data_format="NHWC", training=None):
    """Attach placeholders, the network and its metrics to the default graph.

    ``images``/``labels`` are optional default tensors for the placeholders
    (the in-graph training batch); without them the placeholders must be fed.
    ``training`` is an existing mode flag to share (the towers of one step).
    """
    if images is None:
        images = tf1.placeholder(tf.uint8, [None, 32, 32, 3], name="images")
        labels = tf1.placeholder(tf.int32, [None], name="labels")
    else:
        images = tf1.placeholder_with_default(images, [None, 32, 32, 3], name="images")
        labels = tf1.placeholder_with_default(labels, [None], name="labels")
    if training is None:
        training = tf1.placeholder_with_default(False, [], name="training")
    dtype = COMPUTE_DTYPES[precision]
    x = normalise(images, mean, std, data_format, dtype)
    with tf1.variable_scope(MODEL_SCOPE):
        logits = models.build_logits(cfg.model, x, training, depth=cfg.depth,
                                     data_format=data_format, bn_momentum=cfg.bn_momentum,
                                     bn_epsilon=cfg.bn_epsilon, init=cfg.init,
                                     stride_padding=cfg.stride_padding,
                                     zero_init_residual=cfg.zero_init_residual)
    logits = tf.identity(tf.cast(logits, tf.float32), name="logits")
    example_loss = tf.identity(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits),
        name="example_loss")
    predictions = tf.argmax(logits, axis=1, output_type=tf.int32, name="predictions")
    correct = tf.cast(tf.equal(predictions, labels), tf.float32, name="correct")
    return ModelTensors(
        graph=tf1.get_default_graph(), images=images, labels=labels, training=training,
        logits=logits, probabilities=tf.nn.softmax(logits, name="probabilities"),
        predictions=predictions, example_loss=example_loss,
        loss=tf.reduce_mean(example_loss, name="loss"), correct=correct,
        accuracy=tf.reduce_mean(correct, name="accuracy"),
        precision=precision, data_format=data_format)


def weight_decay_loss(cfg: TrainConfig):
    """``wd * sum(||w||^2) / 2`` over the kernels (not biases, not batch norm)."""
    kernels = [v for v in tf1.trainable_variables(MODEL_SCOPE) if v.op.name.endswith("/kernel")]
    if not cfg.weight_decay or not kernels:
        return tf.constant(0.0)
    return cfg.weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in kernels])


def averaged_variables():
    """What the weight average covers: the model's trainable variables and its
    batch-norm moving statistics (collection MOVING_AVERAGE_VARIABLES, ops.py).

    These are exactly the variables ``ExponentialMovingAverage.variables_to_restore``
    maps to averages, so the eval graph's Saver finds a shadow for each. The
    statistics are averaged as well so that they belong to the averaged weights
    (as in TF-slim's training script and timm's ModelEma) rather than to the
    weights of the last steps.
    """
    trainable = tf1.trainable_variables(MODEL_SCOPE)
    seen = {v.ref() for v in trainable}
    stats = [v for v in tf1.get_collection(tf1.GraphKeys.MOVING_AVERAGE_VARIABLES, MODEL_SCOPE)
             if v.ref() not in seen]
    return trainable + stats


def average_weights(cfg: TrainConfig, train_op, global_step):
    """With ``cfg.ema_decay``: a train op that, after ``train_op``'s update (a
    control dependency), moves every shadow variable towards its variable.

    ``shadow -= (1 - d) * (shadow - variable)`` with d = min(ema_decay,
    (1 + step) / (10 + step)), TensorFlow's ``num_updates`` warm-up, so the
    early averages are not dominated by the initial weights. The shadows start
    at the initial values, are global variables (checkpointed and restored on
    --resume) and are named ``<variable>/ExponentialMovingAverage``. Training
    goes on with the raw weights. Returns (train_op, ema or None).

    With fp16 a step that loss scaling skips still runs the average, which
    then moves its shadows towards the unchanged weights (``num_updates``
    stays, so the decay does too): a small pull, not a wrong value.
    """
    if not cfg.ema_decay:
        return train_op, None
    ema = tf1.train.ExponentialMovingAverage(cfg.ema_decay, num_updates=global_step,
                                             name=EMA_NAME)
    variables = averaged_variables()
    with tf.control_dependencies([train_op]):
        update = ema.apply(variables)
    return tf.group(update), ema


def attach_averaged_model(cfg: TrainConfig, mean, std, ema, *, precision, data_format):
    """A second copy of the network, in inference mode, reading the shadow
    variables of ``ema`` instead of the weights; its tensors are named under
    ``averaged/`` (``averaged/images:0``, ``averaged/logits:0``, ...)."""
    def shadow(getter, name, *args, **kwargs):
        var = getter(name, *args, **kwargs)
        average = ema.average(var)
        return var if average is None else average

    pending = tf1.get_collection_ref(ops.STATISTICS_UPDATES)
    before = len(pending)
    with tf1.variable_scope(tf1.get_variable_scope(), reuse=True, custom_getter=shadow), \
            tf1.name_scope(AVERAGED_SCOPE):
        averaged = attach_model(cfg, mean, std, precision=precision, data_format=data_format)
    # Its batch norms recorded updates of the shadow statistics; nothing may run
    # them (they would be no-ops in inference mode anyway): drop them.
    del pending[before:]
    return averaged


def restore_variables(cfg: TrainConfig):
    """The Saver ``var_list`` that loads a run's checkpoint into an eval graph
    built in the default graph: the averaged weights and statistics of an
    ``ema_decay`` run (``variables_to_restore``), else the variables as saved."""
    if not cfg.ema_decay:
        return tf1.global_variables()
    return tf1.train.ExponentialMovingAverage(cfg.ema_decay, name=EMA_NAME).variables_to_restore()


def training_loss(cfg: TrainConfig, t: "ModelTensors"):
    """The data term that is minimised: ``loss`` itself, or with label smoothing
    the cross-entropy against (1 - s) * one_hot + s / classes. ``loss:0`` stays
    the plain cross-entropy, so histories compare across recipes."""
    if not cfg.label_smoothing:
        return t.loss
    classes = t.logits.shape[-1]
    off = cfg.label_smoothing / classes
    targets = tf.one_hot(t.labels, classes, on_value=1.0 - cfg.label_smoothing + off, off_value=off)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=t.logits),
                          name="smoothed_loss")


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
    return tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(x)) for x in tensors]))


def _minimize(optimizer, loss, var_list, global_step, scaling: Optional[LossScaling],
              statistics, compute=None):
    """Gradients, batch-norm statistics and the update; with ``scaling``, dynamic
    loss scaling.

    ``statistics`` are the pending moving-statistics updates (ops.StatisticUpdate)
    of the batch norms whose statistics this step moves. ``compute(scale)``, when
    given, returns ``(grads, deltas)`` in place of ``tf.gradients(loss * scale)
    / scale`` and the statistics' own deltas (``scale`` is None without loss
    scaling): several towers and processes average both in it (see
    :func:`build_train_graph`).

    Returns the train op. Its control inputs are the statistics' assignments in
    UPDATE_OPS. With loss scaling the loss is multiplied by ``scale`` before
    differentiation and the gradients divided by it; a step whose gradients or
    statistics hold inf/NaN is skipped: no weight, slot, statistic or
    ``global_step`` changes, ``skipped_steps`` grows and the scale halves
    (not below 1); ``LOSS_SCALE_GROWTH_STEPS`` applied steps in a row double
    it, up to ``MAX_LOSS_SCALE``.
    """
    if compute is None:
        def compute(scale):
            grads = tf.gradients(loss if scale is None else loss * scale, var_list)
            if scale is not None:
                grads = [g / scale for g in grads]
            return grads, [u.delta for u in statistics]
    if scaling is None:
        grads, deltas = compute(None)
        updates = ops.moving_statistics_updates(statistics, deltas)
        with tf.control_dependencies(updates):
            return optimizer.apply_gradients(zip(grads, var_list), global_step)
    scale, good, skipped = scaling.scale, scaling.good_steps, scaling.skipped_steps
    grads, deltas = compute(scale)
    finite = all_finite(list(grads) + list(deltas))
    updates = ops.moving_statistics_updates(statistics, deltas, gate=finite)

    def apply():
        update = optimizer.apply_gradients(zip(grads, var_list), global_step)
        with tf.control_dependencies([update]):
            grow = good + 1 >= LOSS_SCALE_GROWTH_STEPS
            return tf.group(
                scale.assign(tf.where(grow, tf.minimum(scale * 2.0, MAX_LOSS_SCALE), scale)),
                good.assign(tf.where(grow, tf.zeros_like(good), good + 1)))

    def skip():
        return tf.group(scale.assign(tf.maximum(scale / 2.0, 1.0)),
                        good.assign(tf.zeros_like(good)), skipped.assign_add(1))

    with tf.control_dependencies(updates):
        return tf.cond(finite, apply, skip)


def build_train_graph(cfg: TrainConfig, mean, std, num_train: int, *,
                      precision="fp32", data_format="NHWC", devices: int = 1,
                      device_type: str = "CPU", shard=(0, 1), reduce=None,
                      device_prefix: str = "") -> TrainTensors:
    """Build a complete training graph in the default graph.

    Args:
      cfg: the run's configuration.
      mean, std: per-channel normalisation of uint8 pixels (0..255 units).
      num_train: images in the training split (the in-graph data variables).
      precision, data_format: resolved values (not ``auto``).
      devices: towers, one per device ``/device:<device_type>:i``; the
        global batch ``cfg.batch_size`` is split evenly between them.
      shard: (rank, workers): this process takes rows ``rank * b:(rank + 1) * b``
        (b = batch_size / workers) of every global batch (docs/distributed.md).
      reduce: ``reduce(values, metrics) -> (values, metrics)`` averages the
        gradients and batch-norm statistics deltas (``values``) and the
        ``loss``/``accuracy`` metrics across processes (see
        resnet_graph.distributed).
      device_prefix: ``/job:<job>/replica:0/task:<i>`` of this process, or "".

    With one device, one process and no ``reduce`` the graph is the plain
    single-device one. Otherwise see :func:`_build_replicated_graph`.
    """
    if devices > 1 or tuple(shard) != (0, 1) or reduce is not None:
        return _build_replicated_graph(cfg, mean, std, num_train, precision=precision,
                                       data_format=data_format, devices=devices,
                                       device_type=device_type, shard=tuple(shard),
                                       reduce=reduce, device_prefix=device_prefix)
    tf1.set_random_seed(cfg.seed)
    global_step = tf1.train.get_or_create_global_step()
    scaling = loss_scaling_state() if precision == "fp16" else None
    steps = steps_taken(global_step, scaling)
    inp = _training_input(cfg, num_train, steps)
    batch_images, batch_labels = inp.batch_images, inp.batch_labels
    # --xla: compile the model, its gradients and the update (jit_scope marks
    # every op created inside; it works on CPUs and GPUs alike).
    with tf.xla.experimental.jit_scope() if cfg.xla else contextlib.nullcontext():
        t = attach_model(cfg, mean, std, images=batch_images, labels=batch_labels,
                         precision=precision, data_format=data_format)
        total_loss = tf.add(training_loss(cfg, t), weight_decay_loss(cfg), name="total_loss")
        lr = learning_rate(cfg, steps, max(num_train // cfg.batch_size, 1))
        optimizer = make_optimizer(cfg, lr)
        statistics = tf1.get_collection(ops.STATISTICS_UPDATES, scope=MODEL_SCOPE)
        train_op = _minimize(optimizer, total_loss, tf1.trainable_variables(MODEL_SCOPE),
                             global_step, scaling, statistics)
    train_op, ema = average_weights(cfg, train_op, global_step)
    tensors = _train_tensors(t, total_loss, lr, train_op, global_step, steps, inp, scaling,
                             step_loss=t.loss, step_accuracy=t.accuracy)
    if ema is not None:
        tensors.ema = ema
        tensors.averaged = attach_averaged_model(cfg, mean, std, ema, precision=precision,
                                                 data_format=data_format)
    return tensors


@dataclasses.dataclass
class _TrainInput:
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


def _training_input(cfg: TrainConfig, num_train: int, steps, *, rank: int = 0,
                    per_process: Optional[int] = None) -> _TrainInput:
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
    return _TrainInput(data_images, data_labels, images_var, labels_var, order, permutation,
                       batch_index, batch_images, batch_labels)


def _train_tensors(t: ModelTensors, total_loss, lr, train_op, global_step, steps,
                   inp: _TrainInput, scaling: Optional[LossScaling], *, step_loss,
                   step_accuracy) -> TrainTensors:
    """The epoch counters and the :class:`TrainTensors` of a built training graph."""
    epochs_done = tf1.get_variable("epochs_done", [], tf.int64, tf1.zeros_initializer(),
                                   trainable=False)
    epoch_placeholder = tf1.placeholder(tf.int64, [], name="epoch")
    # The running sums of an unfinished epoch, so that a checkpoint written in
    # the middle of an epoch (Ctrl-C) resumes with the same epoch metrics.
    epoch_progress = tf1.get_variable("epoch_progress", [3], tf.float64, tf1.zeros_initializer(),
                                      trainable=False)
    progress_placeholder = tf1.placeholder(tf.float64, [3], name="progress")
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(ModelTensors)}
    return TrainTensors(
        **fields, total_loss=total_loss, learning_rate=lr,
        train_op=tf.group(train_op, name="train_op"), global_step=global_step,
        steps_taken=steps,
        epochs_done=epochs_done, set_epochs_done=epochs_done.assign(epoch_placeholder).op,
        epoch_placeholder=epoch_placeholder, epoch_progress=epoch_progress,
        progress_placeholder=progress_placeholder,
        set_epoch_progress=epoch_progress.assign(progress_placeholder).op,
        batch_index=inp.batch_index,
        data_images=inp.data_images, data_labels=inp.data_labels,
        load_data=tf.group(inp.images_var.initializer, inp.labels_var.initializer,
                           inp.order.initializer),
        permutation=inp.permutation, set_permutation=inp.order.assign(inp.permutation).op,
        loss_scale=scaling.scale if scaling else None,
        skipped_steps=scaling.skipped_steps if scaling else None,
        step_loss=step_loss, step_accuracy=step_accuracy)


def _place(device_prefix: str, device: str, variables: str):
    """A device function: variables on ``variables``, every other op on ``device``."""
    compute, store = device_prefix + device, device_prefix + variables

    def place(op):
        return store if op.type in _VARIABLE_OPS else compute
    return place


_VARIABLE_OPS = frozenset({"Variable", "VariableV2", "VarHandleOp", "AutoReloadVariable"})


def _build_replicated_graph(cfg: TrainConfig, mean, std, num_train: int, *, precision,
                            data_format, devices, device_type, shard, reduce,
                            device_prefix) -> TrainTensors:
    """The training graph with towers and/or a share of a multi-process step.

    In-graph replication: tower i runs on ``/device:<device_type>:i`` with the
    variables (created by tower 0, reused by the others) on ``/device:CPU:0``;
    each tower takes its slice of this process's rows of the global batch, its
    gradients are averaged with the others' (then across processes by
    ``reduce``) and applied once. Batch norm: every tower normalises with its
    own batch statistics, and only tower 0's statistics move the moving
    averages (``reduce`` averages their deltas across processes, which gives
    the same values as averaging the updated statistics, since every process
    holds the same ones). The public
    names (``images:0``, ``loss:0``, ...) are tower 0's, so evaluation feeds
    tower 0 alone; ``step_loss``/``step_accuracy`` are the global batch's.
    """
    rank, workers = shard
    if cfg.batch_size % (workers * devices):
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly between "
                         f"{workers} process(es) x {devices} device(s)")
    per_process = cfg.batch_size // workers
    per_tower = per_process // devices
    variables_device = "/device:CPU:0"
    tf1.set_random_seed(cfg.seed)
    with tf.device(device_prefix or None):
        global_step = tf1.train.get_or_create_global_step()
    with tf.device(device_prefix + variables_device):
        scaling = loss_scaling_state() if precision == "fp16" else None
        steps = steps_taken(global_step, scaling)
        inp = _training_input(cfg, num_train, steps, rank=rank, per_process=per_process)
    batch_images, batch_labels = inp.batch_images, inp.batch_labels
    places = [_place(device_prefix, f"/device:{device_type}:{i}", variables_device)
              for i in range(devices)]
    towers, losses, training = [], [], None
    with tf.xla.experimental.jit_scope() if cfg.xla else contextlib.nullcontext():
        for i, place in enumerate(places):
            rows = slice(i * per_tower, (i + 1) * per_tower)
            reuse = tf1.AUTO_REUSE if i else None
            scope = tf1.name_scope(f"tower_{i}") if i else contextlib.nullcontext()
            with tf1.device(place), tf1.variable_scope(tf1.get_variable_scope(), reuse=reuse), \
                    scope:
                images = batch_images if devices == 1 else batch_images[rows]
                labels = batch_labels if devices == 1 else batch_labels[rows]
                t_i = attach_model(cfg, mean, std, images=images, labels=labels,
                                   precision=precision, data_format=data_format,
                                   training=training)
                training = t_i.training
                if i == 0:
                    # Tower 0's batch-norm statistics only (see the docstring).
                    statistics = tf1.get_collection(ops.STATISTICS_UPDATES, scope=MODEL_SCOPE)
                    decay = weight_decay_loss(cfg)
                    total_loss = tf.add(training_loss(cfg, t_i), decay, name="total_loss")
                else:
                    total_loss = training_loss(cfg, t_i) + decay
            towers.append(t_i)
            losses.append(total_loss)
        t = towers[0]
        with tf.device(device_prefix + variables_device):
            step_loss = tf.add_n([x.loss for x in towers]) / float(devices)
            step_accuracy = tf.add_n([x.accuracy for x in towers]) / float(devices)
            lr = learning_rate(cfg, steps, max(num_train // cfg.batch_size, 1))
            optimizer = make_optimizer(cfg, lr)
        var_list = tf1.trainable_variables(MODEL_SCOPE)
        reduced = {}

        def compute(scale):
            per_device = []
            for place, loss in zip(places, losses):
                with tf1.device(place):
                    per_device.append(tf.gradients(loss if scale is None else loss * scale,
                                                   var_list))
            with tf.device(device_prefix + variables_device):
                grads = [g[0] if devices == 1 else tf.add_n(list(g)) / float(devices)
                         for g in zip(*per_device)]
                if scale is not None:
                    grads = [g / scale for g in grads]
                deltas = [u.delta for u in statistics]
                metrics = {"loss": step_loss, "accuracy": step_accuracy}
                if reduce is not None:
                    averaged, metrics = reduce(grads + deltas, metrics)
                    grads, deltas = averaged[:len(grads)], averaged[len(grads):]
                reduced.update(metrics)
            return grads, deltas

        with tf.device(device_prefix + variables_device):
            train_op = _minimize(optimizer, losses[0], var_list, global_step, scaling, statistics,
                                 compute=compute)
    with tf.device(device_prefix + variables_device):
        train_op, ema = average_weights(cfg, train_op, global_step)
    with tf.device(device_prefix or None):
        tensors = _train_tensors(t, losses[0], lr, train_op, global_step, steps, inp, scaling,
                                 step_loss=reduced["loss"], step_accuracy=reduced["accuracy"])
    if ema is not None:
        tensors.ema = ema
        with tf1.device(places[0]):
            tensors.averaged = attach_averaged_model(cfg, mean, std, ema, precision=precision,
                                                     data_format=data_format)
    return tensors


def build_eval_graph(cfg: TrainConfig, mean, std, *, precision="fp32",
                     data_format="NHWC") -> ModelTensors:
    """Placeholders, network and metrics only: what eval and predict need."""
    return attach_model(cfg, mean, std, precision=precision, data_format=data_format)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def session_config(cpu_devices: int = 1):
    """A ConfigProto: soft placement (uint8 data variables stay on the CPU where a
    GPU kernel is missing), GPU memory grown on demand, and thread pools sized
    explicitly to the usable cores: on the 2-core CPU of docs/performance.md
    that trained bf16 ResNet-32 1.2-1.5x faster than TensorFlow's defaults."""
    cores = usable_cores()
    config = tf1.ConfigProto(allow_soft_placement=True, intra_op_parallelism_threads=cores,
                             inter_op_parallelism_threads=cores)
    config.gpu_options.allow_growth = True
    if cpu_devices > 1:   # logical CPU devices for --devices N without GPUs
        config.device_count["CPU"] = cpu_devices
    return config
