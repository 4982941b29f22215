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
from .precision import check_runnable, gpu_available, resolve_data_format, resolve_precision
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
