"""Look at a model without training it (its layer table and its step speed) and at
the machine (``info``).

``summary`` builds the inference graph and counts parameters per stage;
``bench`` builds the real training graph on random in-graph data and times
training steps (forward, backward, update) after a warm-up, with the fetches
and reads of the training loop (graph.step_fetches, graph.sums_fetches).
"""

import platform
import time

import numpy as np
import tensorflow as tf

from . import data, fetch, runtime
from .config import TrainConfig
from .errors import DataError
from .graph import (
    MODEL_SCOPE,
    READ_EVERY_STEPS,
    build_eval_graph,
    build_train_graph,
    step_fetches,
    sums_fetches,
)
from .models import STAGE_FILTERS, layer_counts
from .precision import (
    check_runnable,
    gpu_available,
    kernel_problem,
    resolve_data_format,
    resolve_precision,
)
from .replicate import build_replicated_graph, tower_device_type
from .runtime import describe_device, session_config

tf1 = tf.compat.v1


def model_summary(cfg: TrainConfig) -> dict:
    """Parameters and layers per part of the network (stem, stages, head)."""
    graph = tf.Graph()
    with graph.as_default():
        build_eval_graph(cfg, (0.0,) * 3, (1.0,) * 3)
        variables = tf1.trainable_variables(MODEL_SCOPE)
    convs, dense_layers = layer_counts(graph)
    n = cfg.blocks_per_stage
    parts = [("stem", "32x32", STAGE_FILTERS[0], "-", 1)]
    for i, filters in enumerate(STAGE_FILTERS):
        size = 32 >> i
        parts.append((f"stage{i + 1}", f"{size}x{size}", filters, n, 2 * n))
    parts.append(("head", "1x1", 10, "-", 0))
    rows = []
    for name, size, filters, blocks, part_convs in parts:
        prefixes = (f"{MODEL_SCOPE}/final_bn/", f"{MODEL_SCOPE}/dense/") if name == "head" \
            else (f"{MODEL_SCOPE}/{name}/",)
        params = sum(int(np.prod(v.shape)) for v in variables if v.name.startswith(prefixes))
        rows.append({"part": name, "output": size, "filters": filters, "blocks": blocks,
                     "conv_layers": part_convs, "dense_layers": int(name == "head"),
                     "params": params})
    return {"model": cfg.model, "depth": cfg.depth,
            "params": sum(int(np.prod(v.shape)) for v in variables),
            "conv_layers": convs, "dense_layers": dense_layers, "stages": rows}


def format_summary(s: dict) -> str:
    lines = [f"{s['model']} ResNet-{s['depth']}" if s["model"] != "plain"
             else f"plain CNN, {s['depth']} layers",
             f"{'part':<8}{'output':>8}{'filters':>9}{'blocks':>8}{'convs':>7}{'dense':>7}{'params':>10}"]
    for r in s["stages"]:
        lines.append(f"{r['part']:<8}{r['output']:>8}{r['filters']:>9}{str(r['blocks']):>8}"
                     f"{r['conv_layers']:>7}{r['dense_layers']:>7}{r['params']:>10,}")
    lines.append(f"{'total':<8}{'':>8}{'':>9}{'':>8}{s['conv_layers']:>7}{s['dense_layers']:>7}"
                 f"{s['params']:>10,}  ({s['params'] / 1e6:.2f}M trainable)")
    return "\n".join(lines)


def benchmark(cfg: TrainConfig, *, steps: int = 50, warmup: int = 10,
              num_images: int = 5000, feed: bool = False) -> dict:
    """Images per second of training steps of ``cfg`` on random data.

    By default the data sit in the graph exactly as in training
    (``num_images`` random images; the order is shuffled once), so the number
    includes the in-graph batching and augmentation but no disk or Python
    feeding. ``feed=True`` instead feeds each batch from numpy through the
    ``images``/``labels`` placeholders (``feed_dict``), the classic TF1 input,
    for comparison.
    """
    gpu = gpu_available()
    precision = resolve_precision(cfg.precision, gpu)
    data_format = resolve_data_format(cfg.data_format, gpu, precision)
    check_runnable(precision, data_format, cfg.xla)
    num_images = max(num_images, cfg.batch_size)
    rng = np.random.default_rng(cfg.seed)
    images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, num_images, dtype=np.int32)
    per_epoch = num_images // cfg.batch_size
    graph = tf.Graph()
    with graph.as_default():
        t = build_train_graph(cfg, (125.0,) * 3, (63.0,) * 3, num_images,
                              precision=precision, data_format=data_format)
        init = tf1.global_variables_initializer()
    graph.finalize()
    with tf1.Session(graph=graph, config=session_config()) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: images, t.data_labels: labels})
        sess.run(t.set_permutation, {t.permutation: rng.permutation(num_images).astype(np.int32)})

        def feed_dict(step):
            i = step % per_epoch
            if not feed:
                return {t.batch_index: i, t.training: True}
            rows = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
            return {t.images: images[rows], t.labels: labels[rows], t.training: True}

        fetches, sums = step_fetches(t), sums_fetches(t)

        def run(count, offset):
            # What the training loop runs: the train op alone at each step, and a read of
            # the running sums every READ_EVERY_STEPS steps (train.Trainer.run_epoch).
            for i in range(count):
                sess.run(fetches, feed_dict(offset + i))
                if (offset + i + 1) % READ_EVERY_STEPS == 0:
                    sess.run(sums)

        run(warmup, 0)
        start = time.perf_counter()
        run(steps, warmup)
        seconds = time.perf_counter() - start
    return {"model": cfg.model, "depth": cfg.depth, "batch_size": cfg.batch_size,
            "precision": precision, "data_format": data_format, "xla": cfg.xla,
            "input": "feed_dict" if feed else "in-graph", "device": describe_device(), "steps": steps, "seconds": seconds,
            "images_per_sec": steps * cfg.batch_size / seconds}


def environment_info(data_dir=None) -> dict:
    """What ``resnet-graph info`` reports: versions, devices, the ``auto`` choices, the data."""
    gpus = runtime.gpu_count() > 0
    onednn = runtime.onednn_state()
    precision = resolve_precision("auto", gpus)
    facts = {
        "resnet_graph": _version(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "device": runtime.describe_device(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "cpu_bf16_units": runtime.cpu_has_bf16(),
        "cpu_features": sorted(runtime.cpu_flags() & runtime.INTERESTING_CPU_FLAGS),
        "onednn": onednn[0],
        "onednn_reason": onednn[1],
        "auto_precision": precision,
        "auto_data_format": resolve_data_format("auto", gpus, precision),
        "usable_cores": runtime.usable_cores(),
    }
    try:
        folder = fetch.find_data_dir(data_dir, download=False, progress=False)
    except DataError as e:
        facts.update(data_dir=None, data_complete=False, data_problem=str(e))
        return facts
    problems = []
    if (folder / data.TEST_FILE).is_file():   # the binary layout: sizes are known
        for name in data.TRAIN_FILES + (data.TEST_FILE,):
            size = (folder / name).stat().st_size
            if size != 10000 * data.RECORD_BYTES:
                problems.append(f"{name} has {size} bytes, not {10000 * data.RECORD_BYTES}")
    facts.update(data_dir=str(folder), data_complete=not problems,
                 data_problem="; ".join(problems) or None)
    return facts


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("resnet-graph")
    except Exception:  # noqa: BLE001 - not installed (a source checkout)
        return "unknown"


# -- info --check: a few training steps in every setting this machine offers -------------

# Every precision, layout and XLA setting; the first is the reference the others' losses
# are compared with.
CHECK_SETTINGS = tuple((p, f, x) for p in ("fp32", "fp16", "bf16") for f in ("NHWC", "NCHW")
                       for x in (False, True))
CHECK_DEPTH = 8          # ResNet-8: a few seconds per setting on a 2-core CPU
CHECK_BATCH = 32
CHECK_STEPS = 4          # per setting; the first (graph start-up, XLA compilation) untimed
# Largest relative difference of a step's loss from fp32's that still agrees. Measured on
# the 2-core EPYC (docs/performance.md): float32 in another layout or with XLA 2e-5, fp16
# 4e-5, bf16 2e-4; the bounds leave room for a GPU's TF32 and tensor-core rounding, while a
# wrong kernel, update or loss scale moves the losses of these steps by 1e-1 or more.
LOSS_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-3, "bf16": 2e-2}


def _check_steps(cfg: TrainConfig, images, labels, initial):
    """Train ``cfg`` for ``len(...)`` steps from the weights ``initial`` (name -> value; None
    keeps the graph's own, which are returned); returns (losses, seconds of the timed steps,
    initial values, skipped steps)."""
    precision, data_format = cfg.precision, cfg.data_format
    graph = tf.Graph()
    with graph.as_default():
        t = build_replicated_graph(cfg, (125.0,) * 3, (63.0,) * 3, len(images),
                                   precision=precision, data_format=data_format,
                                   devices=1, device_type=tower_device_type(1))
        model = [v for v in tf1.global_variables() if v.op.name.startswith(MODEL_SCOPE + "/")
                 and "/Momentum" not in v.op.name]
        init = tf1.global_variables_initializer()
    graph.finalize()
    losses, seconds = [], 0.0
    with tf1.Session(graph=graph, config=session_config()) as sess:
        sess.run(init)
        if initial is None:
            initial = dict(zip((v.op.name for v in model), sess.run(model)))
        else:
            for v in model:
                v.load(initial[v.op.name], sess)
        sess.run(t.load_data, {t.data_images: images, t.data_labels: labels})
        for step in range(CHECK_STEPS):
            start = time.perf_counter()
            _, loss = sess.run([t.train_op, t.step_loss], {t.batch_index: step, t.training: True})
            if step:
                seconds += time.perf_counter() - start
            losses.append(float(loss))
        skipped = int(sess.run(t.skipped_steps)) if t.skipped_steps is not None else 0
    return losses, seconds, initial, skipped


def self_check(settings=None, *, model: str = "original", seed: int = 0) -> dict:
    """``info --check``: ``CHECK_STEPS`` training steps of ResNet-``CHECK_DEPTH`` (batch
    ``CHECK_BATCH``, random in-graph images, no augmentation, SGD momentum) in every
    setting of ``settings`` (default: every precision, layout and XLA setting), each
    from the same initial weights as the first (fp32 NHWC, the reference); for each:
    whether it runs (else why not), images/s of the timed steps, and its step losses
    against the reference's (largest relative difference, and whether it is within
    ``LOSS_TOLERANCE``). Built as training builds it (on the GPU when there is one)."""
    settings = list(settings or CHECK_SETTINGS)
    rng = np.random.default_rng(seed)
    n = CHECK_BATCH * CHECK_STEPS
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.int32)
    started = time.perf_counter()
    results, reference, initial = [], None, None
    for precision, data_format, xla in settings:
        entry = {"precision": precision, "data_format": data_format, "xla": xla, "runs": False,
                 "reason": kernel_problem(data_format, precision, xla), "images_per_sec": None,
                 "losses": None, "loss_difference": None, "loss_agrees": None,
                 "skipped_steps": None}
        results.append(entry)
        if entry["reason"] is not None:
            continue
        cfg = TrainConfig(model=model, depth=CHECK_DEPTH, batch_size=CHECK_BATCH, lr=0.05,
                          optimizer="momentum", augment=False, precision=precision,
                          data_format=data_format, xla=xla, seed=seed)
        try:
            losses, seconds, initial, skipped = _check_steps(cfg, images, labels, initial)
        except (tf.errors.OpError, ValueError, TypeError) as e:
            entry["reason"] = runtime.error_reason(e)
            continue
        if reference is None:
            reference = losses
        difference = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(losses, reference))
        entry.update(runs=True, reason=None, losses=losses, skipped_steps=skipped,
                     images_per_sec=(CHECK_STEPS - 1) * CHECK_BATCH / seconds if seconds else None,
                     loss_difference=difference,
                     loss_agrees=bool(difference <= LOSS_TOLERANCE[precision]))
    first = settings[0]
    return {"model": model, "depth": CHECK_DEPTH, "batch_size": CHECK_BATCH,
            "steps": CHECK_STEPS, "timed_steps": CHECK_STEPS - 1,
            "reference": f"{first[0]} {first[1]}{' xla' if first[2] else ''}",
            "reference_losses": reference, "loss_tolerance": dict(LOSS_TOLERANCE),
            "device": describe_device(), "settings": results,
            "seconds": time.perf_counter() - started}


def format_check(check: dict) -> str:
    """The plain-text table of :func:`self_check`."""
    lines = [f"check: {check['model']}-{check['depth']}, batch {check['batch_size']}, "
             f"{check['steps']} steps per setting (the first untimed) on {check['device']}; "
             f"step losses against {check['reference']}",
             f"{'precision':<10}{'layout':<7}{'xla':<5}{'runs':<6}{'img/s':>8}  "
             f"{'max loss diff':>13}  agrees"]
    for e in check["settings"]:
        head = f"{e['precision']:<10}{e['data_format']:<7}{'yes' if e['xla'] else 'no':<5}"
        if not e["runs"]:
            lines.append(f"{head}{'no':<6}{'':>8}  {e['reason']}")
            continue
        speed = f"{e['images_per_sec']:.0f}" if e["images_per_sec"] else "-"
        lines.append(f"{head}{'yes':<6}{speed:>8}  {e['loss_difference']:>13.2e}  "
                     f"{'yes' if e['loss_agrees'] else 'NO'}"
                     + (f" ({e['skipped_steps']} steps skipped)" if e["skipped_steps"] else ""))
    lines.append(f"({check['seconds']:.0f} s)")
    return "\n".join(lines)
