"""``resnet-graph responses``: the layer responses of a trained run (He et al. 2015, Fig. 7).

For every 3x3 convolution of the run's model (in layer order) the standard
deviation of its response over the whole test set, in inference mode (batch
norm with its moving statistics, as evaluation): over every image, pixel and
channel of the response tensor. What the response is for each model is said
in resnet_graph.probes. The moments are summed per batch in float64 in the
graph, so the result does not depend on the batch size.

The result is written into the run folder as ``responses.json`` (atomically;
``responses-best.json`` for the best-validation checkpoint)::

    {"run": "plain-20-s0", "model": "plain", "depth": 20, "checkpoint": "latest",
     "split": "test", "examples": 10000, "precision": "fp32",
     "layers": [{"index": 1, "name": "stem/conv", "std": 0.61, "mean": 0.02}, ...]}
"""

import json
import math
import pathlib

import numpy as np

from . import checkpoint
from .config import TrainConfig
from .evaluate import open_run, run_split
from .fsutil import atomic_write_text
from .probes import response_moments, response_tensors

RESPONSES_FILE = "responses.json"
BEST_RESPONSES_FILE = "responses-best.json"   # of the best-validation checkpoint (--best)


def layer_responses(run_dir, *, best: bool = False, data_dir=None, batch_size: int = 500,
                    precision: str = "auto", write: bool = True) -> dict:
    """Measure the responses of ``run_dir``'s latest (``best``: best-validation)
    checkpoint on the test set; with ``write``, also store them as responses.json."""
    run_dir = pathlib.Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    cfg = TrainConfig.from_dict(saved)
    test = run_split(run_dir, "test", data_dir=data_dir, best=best)
    with open_run(run_dir, best=best, precision=precision) as (sess, tensors, _):
        with sess.graph.as_default():
            layers = response_tensors(sess.graph)
            moments_op = response_moments(layers)
        totals = np.zeros((len(layers), 3), np.float64)
        for start in range(0, len(test), batch_size):
            totals += sess.run(moments_op, {tensors.images: test.images[start:start + batch_size],
                                            tensors.training: False})
        used = tensors.precision
    count, total, squares = totals[:, 0], totals[:, 1], totals[:, 2]
    mean = total / count
    variance = np.maximum(squares / count - mean ** 2, 0.0)
    result = {
        "run": str(saved.get("name", run_dir.name)), "model": cfg.model, "depth": cfg.depth,
        "checkpoint": "best" if best else "latest", "split": "test", "examples": len(test),
        "precision": used,
        "layers": [{"index": i + 1, "name": name, "std": float(math.sqrt(v)), "mean": float(m)}
                   for i, ((name, _), v, m) in enumerate(zip(layers, variance, mean))],
    }
    if write:
        atomic_write_text(run_dir / (BEST_RESPONSES_FILE if best else RESPONSES_FILE),
                          json.dumps(result, indent=2) + "\n")
    return result
