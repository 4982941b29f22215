"""In-graph replication: the training graph of several towers and/or of one share
of a multi-process step (docs/distributed.md).

Tower i runs on ``/device:<device_type>:i``; the variables, the gradient
average, the optimizer update, loss scaling and the weight average on the
first tower's device (``/device:GPU:0`` when GPUs are visible, see
docs/architecture.md); the input pipeline and the all-reduce across processes
on the host's ``/device:CPU:0``. The pieces (the model, the losses, the optimizer, the
update with its batch-norm statistics and loss scaling) are graph.py's; this
module only places them, splits the batch and averages the gradients.
"""

import contextlib

import tensorflow as tf

from . import ops
from .config import TrainConfig, check_batch_split
from .errors import UserError
from .graph import (
    MODEL_SCOPE,
    TrainTensors,
    attach_averaged_model,
    attach_model,
    average_weights,
    build_train_graph,
    last_step_rate,
    learning_rate,
    make_optimizer,
    minimize,
    train_tensors,
    training_loss,
    weight_decay_loss,
    xla_scope,
)
from .inputs import training_input
from .precision import loss_scaling_state, steps_taken
from .runtime import gpu_count

tf1 = tf.compat.v1


def tower_device_type(devices: int) -> str:
    """Where ``devices`` towers run: ``GPU`` when GPUs are visible (and enough of
    them), one tower included, else ``CPU`` (logical CPU devices). UserError for
    fewer than one tower or more towers than GPUs."""
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    gpus = gpu_count()
    if 0 < gpus < devices:
        raise UserError(f"--devices {devices} but only {gpus} GPUs are visible; "
                        f"use --devices {gpus} or fewer")
    return "GPU" if gpus else "CPU"


def _place(device_prefix: str, device: str, variables: str):
    """A device function: variables on ``variables``, every other op on ``device``."""
    compute, store = device_prefix + device, device_prefix + variables

    def place(op):
        return store if op.type in _VARIABLE_OPS else compute
    return place


_VARIABLE_OPS = frozenset({"Variable", "VariableV2", "VarHandleOp", "AutoReloadVariable"})


def build_replicated_graph(cfg: TrainConfig, mean, std, num_train: int, *,
                           precision="fp32", data_format="NHWC", devices: int = 1,
                           device_type: str = "CPU", shard=(0, 1), reduce=None,
                           device_prefix: str = "") -> TrainTensors:
    """The training graph with towers and/or a share of a multi-process step.

    Args (the first five as graph.build_train_graph's):
      devices: towers, one per device ``/device:<device_type>:i``; the
        global batch ``cfg.batch_size`` is split evenly between them.
      shard: (rank, workers): this process takes rows ``rank * b:(rank + 1) * b``
        (b = batch_size / workers) of every global batch (docs/distributed.md).
      reduce: ``reduce(values, metrics) -> (values, metrics)`` averages the
        gradients and batch-norm statistics deltas (``values``) and the
        ``loss``/``accuracy`` metrics across processes (see
        resnet_graph.distributed).
      device_prefix: ``/job:<job>/replica:0/task:<i>`` of this process, or "".

    With one CPU device, one process and no ``reduce`` this is the plain
    single-device graph of graph.build_train_graph, placed by TensorFlow.

    In-graph replication: tower i runs on ``/device:<device_type>:i`` with the
    variables (created by tower 0, reused by the others), the gradient average,
    the update, loss scaling and the weight average on tower 0's device; the
    input pipeline (uint8 data variables, gather, augmentation) and the
    all-reduce across processes (``reduce``, over gRPC) on the host CPU;
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
    if devices == 1 and tuple(shard) == (0, 1) and reduce is None and device_type == "CPU":
        return build_train_graph(cfg, mean, std, num_train, precision=precision,
                                 data_format=data_format)
    rank, workers = shard
    check_batch_split(cfg.batch_size, devices, workers, error=ValueError)
    per_process = cfg.batch_size // workers
    per_tower = per_process // devices
    host = device_prefix + "/device:CPU:0"
    variables_device = f"/device:{device_type}:0"
    tf1.set_random_seed(cfg.seed)
    with tf.device(device_prefix + variables_device):
        global_step = tf1.train.get_or_create_global_step()
        scaling = loss_scaling_state() if precision == "fp16" else None
        steps = steps_taken(global_step, scaling)
    with tf.device(host):
        inp = training_input(cfg, num_train, steps, rank=rank, per_process=per_process)
    batch_images, batch_labels = inp.batch_images, inp.batch_labels
    places = [_place(device_prefix, f"/device:{device_type}:{i}", variables_device)
              for i in range(devices)]
    towers, losses, training = [], [], None
    with xla_scope(cfg.xla):
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
                # On the host: the collective runs over gRPC between the processes.
                with tf.device(host), tf1.name_scope("all_reduce"):
                    averaged, metrics = reduce(grads + deltas, metrics)
                grads, deltas = averaged[:len(grads)], averaged[len(grads):]
            reduced.update(metrics)
            return grads, deltas

        with tf.device(device_prefix + variables_device):
            train_op, applied = minimize(optimizer, losses[0], var_list, global_step, scaling,
                                         statistics, compute=compute)
    with tf.device(device_prefix + variables_device):
        train_op, ema = average_weights(cfg, train_op, global_step, applied)
    with tf.device(device_prefix + variables_device):
        tensors = train_tensors(t, losses[0], lr, train_op, global_step, steps, inp, scaling,
                                 step_loss=reduced["loss"], step_accuracy=reduced["accuracy"],
                                 applied=applied,
                                 last_step_lr=last_step_rate(cfg, steps, num_train))
    if ema is not None:
        tensors.ema = ema
        with tf1.device(places[0]):
            tensors.averaged = attach_averaged_model(cfg, mean, std, ema, precision=precision,
                                                     data_format=data_format)
    return tensors
