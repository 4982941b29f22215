"""Attach a model to a ``tf.Graph``: placeholders, the network, loss, metrics,
learning rate, optimizer and the weight average.

:func:`build_train_graph` makes everything a run on one device in one process
needs (resnet_graph.replicate builds the towers of several devices and
processes from the same pieces); :func:`minimize` is the one place where
batch-norm updates are tied to the train op. The input pipeline is in
resnet_graph.inputs, the precision policy and loss scaling in
resnet_graph.precision. The graph's public tensors have names, so anything
can fetch them by name as well:

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
``skipped_after_step:0``      (fp16) steps skipped so far, read after the train op
============================  ==================================================

The running sums of an epoch are kept in the graph: every training step adds
its loss and accuracy (of the applied steps only: a step that fp16 loss
scaling skips adds nothing, and counts in ``loss_scaling/epoch_skipped``) to
the variable ``epoch_progress``, so a step fetches nothing but the train op,
and the loop reads the sums now and then (:func:`step_fetches`,
:func:`sums_fetches`).

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
"""

import contextlib
import dataclasses
from typing import Optional

import tensorflow as tf

from . import models, ops
from .config import TrainConfig
from .inputs import TrainInput, normalise, training_input
from .precision import (
    COMPUTE_DTYPES,
    LossScaling,
    all_finite,
    guarded_update,
    loss_scaling_state,
    steps_taken,
)

tf1 = tf.compat.v1

MODEL_SCOPE = "model"
# The weight average's name: the shadow of variable v is "<v.op.name>/<EMA_NAME>"
# in the checkpoint (TensorFlow's default name).
EMA_NAME = "ExponentialMovingAverage"
AVERAGED_SCOPE = "averaged"


def learning_rate(cfg: TrainConfig, global_step, steps_per_epoch: int = 1,
                  name: str = "learning_rate"):
    """The schedule as a function of the optimizer step (see TrainConfig).

    A cosine run lengthened in its decay (``cfg.decay_from_step``, see
    :func:`lengthened`) restarts the decay at that step from the rate it had
    reached: a half cosine from ``cfg.decay_from_lr`` down to 0 at the new end.
    """
    if cfg.lr_schedule == "step" and cfg.lr_boundaries:
        values = [cfg.lr * cfg.lr_decay ** i for i in range(len(cfg.lr_boundaries) + 1)]
        # Step b (0-based) is the first at the new rate, as Caffe's multistep: b steps at
        # the old one. piecewise_constant keeps x <= boundary in the old interval.
        lr = tf1.train.piecewise_constant(global_step, [b - 1 for b in cfg.lr_boundaries],
                                          values)
    elif cfg.lr_schedule == "cosine":
        restart = ((cfg.decay_from_step, cfg.decay_from_lr) if cfg.decay_from_step else None)
        lr = cosine_with_warmup(cfg.lr, global_step, cfg.epochs * steps_per_epoch,
                                min(cfg.warmup_epochs, cfg.epochs) * steps_per_epoch,
                                restart=restart)
    else:
        lr = tf.constant(cfg.lr, tf.float32)
    return tf.identity(tf.cast(lr, tf.float32), name=name)


def last_step_rate(cfg: TrainConfig, steps, num_train: int):
    """The rate of the step last taken (``steps`` - 1), which the loop records at an
    epoch's end: read after the step, by itself, so that every training step
    fetches the same thing (the train op alone; each new combination of fetches
    costs the session a new executor and a new Grappler pass over the whole
    graph, 1-2 s for ResNet-32 on the 2-core EPYC, docs/performance.md)."""
    return learning_rate(cfg, steps - 1, max(num_train // cfg.batch_size, 1),
                         name="learning_rate_of_last_step")


def cosine_with_warmup(peak: float, global_step, total_steps: int, warmup_steps: float,
                       restart=None):
    """Rise linearly to ``peak`` over ``warmup_steps`` (step s trains at
    peak * (s + 1) / warmup), then fall along a half cosine to 0 at ``total_steps``.

    ``restart`` = (step r, rate q): from step r on, a half cosine from q down to 0 at
    ``total_steps`` instead (the steps before r, trained by the schedule before the
    run was lengthened, read q)."""
    step = tf.cast(global_step, tf.float32)
    if restart is not None:
        start, rate = float(restart[0]), float(restart[1])
        progress = tf.clip_by_value((step - start) / max(float(total_steps) - start, 1.0),
                                    0.0, 1.0)
        return 0.5 * rate * (1.0 + tf.cos(3.141592653589793 * progress))
    warmup = float(warmup_steps)
    decay_steps = max(float(total_steps) - warmup, 1.0)
    progress = tf.clip_by_value((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + tf.cos(3.141592653589793 * progress))
    if warmup <= 0:
        return cosine
    # min: with a fractional warm-up (0.5 epochs of 351 steps) the last warm-up step
    # would pass the peak.
    rising = tf.minimum(peak * (step + 1.0) / warmup, peak)
    return tf.where(step < warmup, rising, cosine)


def lengthened(saved: TrainConfig, epochs: int, steps_taken: int,
               steps_per_epoch: int) -> TrainConfig:
    """``saved`` (a run that has taken ``steps_taken`` steps) trained to ``epochs``
    instead: what ``--resume --epochs`` does to its learning-rate schedule.

    - ``step`` and ``constant``: nothing (the boundaries are optimizer steps: the
      run goes on at the rate it has reached, the last one once all are passed);
    - ``cosine`` before its decay began (still in its warm-up, or at its very
      start): the decay is stretched to the new end, which changes no step taken;
    - ``cosine`` in its decay: the decay restarts at this step from the rate the
      run had reached (the rate its own schedule gives this step), down to 0 at the
      new end, so no step's rate jumps (``decay_from_step``/``decay_from_lr``,
      recorded in config.json for later resumes);
    - ``cosine`` that has ended (every step of the decay taken, rate 0): refused,
      since a longer run would train at rate 0 (a ValueError that says so).
    """
    if epochs == saved.epochs or saved.lr_schedule != "cosine":
        return saved.replace(epochs=epochs)
    old_total = saved.epochs * steps_per_epoch
    warmup = min(saved.warmup_epochs, saved.epochs) * steps_per_epoch
    if steps_taken >= old_total:
        raise ValueError(
            f"its cosine schedule has ended (rate 0 after {old_total} steps), so more epochs "
            "would train at rate 0; start a new run with the --epochs you want instead")
    if steps_taken <= warmup and not saved.decay_from_step:
        if min(saved.warmup_epochs, epochs) * steps_per_epoch == warmup:
            return saved.replace(epochs=epochs)
    rate = cosine_rate(saved, steps_taken, steps_per_epoch)
    return saved.replace(epochs=epochs, decay_from_step=int(steps_taken), decay_from_lr=rate)


def cosine_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The rate of ``cfg``'s schedule at optimizer step ``step``, computed by the same
    ops as in the graph (:func:`learning_rate`), eagerly (no session): call it
    outside ``graph.as_default()``."""
    if not tf.executing_eagerly():
        raise RuntimeError("cosine_rate runs eagerly: call it outside a graph's as_default()")
    return float(learning_rate(cfg, tf.constant(step, tf.int64), steps_per_epoch))


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
    last_step_lr: tf.Tensor = None     # the rate of the step last taken (read at an epoch's end)
    step_loss: tf.Tensor = None        # loss/accuracy of the whole global batch of a step
    step_accuracy: tf.Tensor = None    # (= loss/accuracy with one device and one process)
    train_op: tf.Operation = None
    global_step: tf.Variable = None    # updates applied
    steps_taken: tf.Tensor = None      # steps taken, applied or skipped (= global_step
    #                                    without loss scaling): the position in the run
    epochs_done: tf.Variable = None
    set_epochs_done: tf.Operation = None
    epoch_placeholder: tf.Tensor = None
    epoch_progress: tf.Variable = None   # float64 [3]: loss sum, accuracy sum (of the applied
    #                                      steps, added by train_op), seconds (set by the loop)
    progress_placeholder: tf.Tensor = None
    set_epoch_progress: tf.Operation = None   # also sets epoch_skipped (fp16) to skipped_value
    epoch_skipped: Optional[tf.Variable] = None   # (fp16) int64: this epoch's skipped steps
    skipped_value: Optional[tf.Tensor] = None     # (fp16) its value for set_epoch_progress (0)
    batch_index: tf.Tensor = None
    data_images: tf.Tensor = None      # placeholders that load the training set
    data_labels: tf.Tensor = None
    load_data: tf.Operation = None
    permutation: tf.Tensor = None      # placeholder for one epoch's order
    set_permutation: tf.Operation = None
    loss_scale: Optional[tf.Variable] = None
    skipped_steps: Optional[tf.Variable] = None
    # skipped_steps read after the step: the one to fetch together with train_op (a fetch
    # of the variable itself may run before the update, and then miss this step's skip).
    skipped_after_step: Optional[tf.Tensor] = None
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


def average_weights(cfg: TrainConfig, train_op, global_step, applied=None):
    """With ``cfg.ema_decay``: a train op that, after ``train_op``'s update (a
    control dependency), moves every shadow variable towards its variable.

    ``shadow -= (1 - d) * (shadow - variable)`` with d = min(ema_decay,
    (1 + step) / (10 + step)), TensorFlow's ``num_updates`` warm-up, so the
    early averages are not dominated by the initial weights. The shadows start
    at the initial values, are global variables (checkpointed and restored on
    --resume) and are named ``<variable>/ExponentialMovingAverage``. Training
    goes on with the raw weights. Returns (train_op, ema or None).

    ``applied`` (fp16: the step's finiteness, from :func:`minimize`) makes a
    step that loss scaling skips leave the shadows alone (decay 1), so the
    average holds the applied steps only, as the weights do.
    """
    if not cfg.ema_decay:
        return train_op, None
    variables = averaged_variables()
    with tf.control_dependencies([train_op]):
        if applied is None:
            ema = tf1.train.ExponentialMovingAverage(cfg.ema_decay, num_updates=global_step,
                                                     name=EMA_NAME)
        else:   # the same decay as num_updates gives, or 1 on a skipped step
            n = tf.cast(global_step, tf.float32)    # read after this step's update
            decay = tf.where(applied, tf.minimum(cfg.ema_decay, (1.0 + n) / (10.0 + n)), 1.0)
            ema = tf1.train.ExponentialMovingAverage(decay, name=EMA_NAME)
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


def minimize(optimizer, loss, var_list, global_step, scaling: Optional[LossScaling],
              statistics, compute=None):
    """Gradients, batch-norm statistics and the update; with ``scaling``, dynamic
    loss scaling.

    ``statistics`` are the pending moving-statistics updates (ops.StatisticUpdate)
    of the batch norms whose statistics this step moves. ``compute(scale)``, when
    given, returns ``(grads, deltas)`` in place of ``tf.gradients(loss * scale)
    / scale`` and the statistics' own deltas (``scale`` is None without loss
    scaling): several towers and processes average both in it (see
    resnet_graph.replicate).

    Returns (train op, applied): the train op's control inputs are the
    statistics' assignments in UPDATE_OPS; ``applied`` is None without loss
    scaling, else the bool tensor "this step is finite and applied". With loss scaling the loss is multiplied by ``scale`` before
    differentiation and the gradients divided by it; a step whose gradients or
    statistics hold inf/NaN is skipped: no weight, slot, statistic or
    ``global_step`` changes, ``skipped_steps`` grows and the scale halves
    (not below 1); ``LOSS_SCALE_GROWTH_STEPS`` applied steps in a row double
    it, up to ``MAX_LOSS_SCALE`` (precision.guarded_update).
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
            return optimizer.apply_gradients(zip(grads, var_list), global_step), None
    grads, deltas = compute(scaling.scale)
    finite = all_finite(list(grads) + list(deltas))
    updates = ops.moving_statistics_updates(statistics, deltas, gate=finite)
    with tf.control_dependencies(updates):
        return guarded_update(scaling, finite, lambda: optimizer.apply_gradients(
            zip(grads, var_list), global_step)), finite


def xla_scope(enabled: bool):
    """With ``enabled`` (--xla), XLA compiles the ops created inside (the model, its
    gradients, the update), but not the variables' initial values: they run once, and
    compiling them took 1.6 s of CPU at every start of a ResNet-8 run on the 2-core EPYC.
    Drawn by TensorFlow rather than XLA's random generator, they are also the same
    with and without --xla for one seed (they were not before)."""
    if not enabled:
        return contextlib.nullcontext()
    return tf.xla.experimental.jit_scope(compile_ops=lambda node: "/Initializer/" not in node.name)


def build_train_graph(cfg: TrainConfig, mean, std, num_train: int, *,
                      precision="fp32", data_format="NHWC") -> TrainTensors:
    """Build a complete training graph of one device and one process in the default graph.

    Args:
      cfg: the run's configuration.
      mean, std: per-channel normalisation of uint8 pixels (0..255 units).
      num_train: images in the training split (the in-graph data variables).
      precision, data_format: resolved values (not ``auto``).

    Several devices or processes: resnet_graph.replicate.build_replicated_graph.
    """
    tf1.set_random_seed(cfg.seed)
    global_step = tf1.train.get_or_create_global_step()
    scaling = loss_scaling_state() if precision == "fp16" else None
    steps = steps_taken(global_step, scaling)
    inp = training_input(cfg, num_train, steps)
    batch_images, batch_labels = inp.batch_images, inp.batch_labels
    # --xla: compile the model, its gradients and the update (jit_scope marks
    # every op created inside; it works on CPUs and GPUs alike).
    with xla_scope(cfg.xla):
        t = attach_model(cfg, mean, std, images=batch_images, labels=batch_labels,
                         precision=precision, data_format=data_format)
        total_loss = tf.add(training_loss(cfg, t), weight_decay_loss(cfg), name="total_loss")
        lr = learning_rate(cfg, steps, max(num_train // cfg.batch_size, 1))
        optimizer = make_optimizer(cfg, lr)
        statistics = tf1.get_collection(ops.STATISTICS_UPDATES, scope=MODEL_SCOPE)
        train_op, applied = minimize(optimizer, total_loss,
                                     tf1.trainable_variables(MODEL_SCOPE),
                                     global_step, scaling, statistics)
    train_op, ema = average_weights(cfg, train_op, global_step, applied)
    tensors = train_tensors(t, total_loss, lr, train_op, global_step, steps, inp, scaling,
                             step_loss=t.loss, step_accuracy=t.accuracy, applied=applied,
                             last_step_lr=last_step_rate(cfg, steps, num_train))
    if ema is not None:
        tensors.ema = ema
        tensors.averaged = attach_averaged_model(cfg, mean, std, ema, precision=precision,
                                                 data_format=data_format)
    return tensors


def train_tensors(t: ModelTensors, total_loss, lr, train_op, global_step, steps,
                   inp: TrainInput, scaling: Optional[LossScaling], *, step_loss,
                   step_accuracy, applied=None, last_step_lr=None) -> TrainTensors:
    """The epoch counters and the :class:`TrainTensors` of a built training graph.

    The train op also adds the step's ``step_loss`` and ``step_accuracy`` to the
    epoch's running sums when the step is ``applied`` (fp16: from
    :func:`minimize`; None: always) and counts it in ``epoch_skipped`` when not."""
    epochs_done = tf1.get_variable("epochs_done", [], tf.int64, tf1.zeros_initializer(),
                                   trainable=False)
    epoch_placeholder = tf1.placeholder(tf.int64, [], name="epoch")
    # The running sums of an unfinished epoch, so that a checkpoint written in
    # the middle of an epoch (Ctrl-C) resumes with the same epoch metrics.
    epoch_progress = tf1.get_variable("epoch_progress", [3], tf.float64, tf1.zeros_initializer(),
                                      trainable=False)
    progress_placeholder = tf1.placeholder(tf.float64, [3], name="progress")
    set_progress = [epoch_progress.assign(progress_placeholder)]
    epoch_skipped = skipped_value = None
    accumulate = []
    if scaling is not None:
        with tf1.variable_scope("loss_scaling"):
            epoch_skipped = tf1.get_variable("epoch_skipped", [], tf.int64,
                                             tf1.zeros_initializer(), trainable=False)
        skipped_value = tf1.placeholder_with_default(tf.constant(0, tf.int64), [],
                                                     name="skipped_value")
        set_progress.append(epoch_skipped.assign(skipped_value))
    with tf1.name_scope("epoch_sums"):
        step = tf.stack([tf.cast(step_loss, tf.float32), tf.cast(step_accuracy, tf.float32),
                         tf.constant(0.0)])
        if applied is not None:
            # A skipped step's loss may be inf: where, not a multiplication by 0.
            step = tf.where(applied, step, tf.zeros_like(step))
            if epoch_skipped is not None:
                accumulate.append(epoch_skipped.assign_add(
                    tf.where(applied, tf.constant(0, tf.int64), tf.constant(1, tf.int64))))
        accumulate.append(epoch_progress.assign_add(tf.cast(step, tf.float64)))
    fields = {f.name: getattr(t, f.name) for f in dataclasses.fields(ModelTensors)}
    train_op = tf.group(train_op, *accumulate, name="train_op")
    skipped_after_step = None
    if scaling is not None:
        with tf.control_dependencies([train_op]):
            skipped_after_step = tf.identity(scaling.skipped_steps.read_value(),
                                             name="skipped_after_step")
    return TrainTensors(
        **fields, total_loss=total_loss, learning_rate=lr, last_step_lr=last_step_lr,
        train_op=train_op, global_step=global_step,
        steps_taken=steps,
        epochs_done=epochs_done, set_epochs_done=epochs_done.assign(epoch_placeholder).op,
        epoch_placeholder=epoch_placeholder, epoch_progress=epoch_progress,
        progress_placeholder=progress_placeholder,
        set_epoch_progress=tf.group(*set_progress), epoch_skipped=epoch_skipped,
        skipped_value=skipped_value,
        batch_index=inp.batch_index,
        data_images=inp.data_images, data_labels=inp.data_labels,
        load_data=tf.group(inp.images_var.initializer, inp.labels_var.initializer,
                           inp.order.initializer),
        permutation=inp.permutation, set_permutation=inp.order.assign(inp.permutation).op,
        loss_scale=scaling.scale if scaling else None,
        skipped_steps=scaling.skipped_steps if scaling else None,
        skipped_after_step=skipped_after_step,
        step_loss=step_loss, step_accuracy=step_accuracy)


# The loop reads the running sums (and checks them: NaN loss, fp16 skips) at least
# every this many steps, besides the reads of the progress display and the epoch's end.
READ_EVERY_STEPS = 20


def step_fetches(t: TrainTensors) -> list:
    """What a training loop fetches at every step: the train op alone, the same list
    at every step (a session builds and optimises a new executor for each new
    combination of fetches). What the loop records besides is read between steps:
    the running sums (:func:`sums_fetches`), and at an epoch's end the rate of its
    last step (``last_step_lr``)."""
    return [t.train_op]


def sums_fetches(t: TrainTensors) -> list:
    """The epoch's running sums (float64 [3]), and with fp16 the epoch's skipped
    steps and the loss scale: what the loop reads between steps."""
    if t.epoch_skipped is None:
        return [t.epoch_progress]
    return [t.epoch_progress, t.epoch_skipped, t.loss_scale]


def build_eval_graph(cfg: TrainConfig, mean, std, *, precision="fp32",
                     data_format="NHWC") -> ModelTensors:
    """Placeholders, network and metrics only: what eval and predict need."""
    return attach_model(cfg, mean, std, precision=precision, data_format=data_format)
