"""How many ops one training step executes: the loop's own fetches, traced.

    .venv/bin/python bench/step_ops.py [--precision fp32 fp16] [--depth 32] [--batch-size 100]

Builds the training graph of a run (in-graph data, Adam, no augmentation: what
``resnet-graph bench`` builds), runs a few untimed steps, then one step with
``RunOptions(trace_level=FULL_TRACE)`` and the fetches ``Trainer.run_epoch``
makes on an ordinary step, and counts the nodes in the step's ``RunMetadata``
step stats (every executed kernel once, on every device). Also counted: the
finiteness checks (``IsFinite``, ``All``) and the ``Switch``/``Merge`` pairs of
``tf.cond``. One line per precision; fp16 runs on a CPU, slowly.
"""

import argparse
import collections

import numpy as np

from resnet_graph.config import TrainConfig
from resnet_graph.graph import build_train_graph, step_fetches
from resnet_graph.runtime import load_tensorflow, session_config

tf = load_tensorflow()
tf1 = tf.compat.v1


def loop_fetches(t):
    """What ``Trainer.run_epoch`` fetches on an ordinary step: the train op alone
    (graph.step_fetches; until issue 26 item 5 it also fetched the step's loss,
    accuracy, rate and, with fp16, the skip count). The loop's read of the running
    sums every graph.READ_EVERY_STEPS steps is a separate, small run, not counted."""
    return step_fetches(t)


def count_ops(precision: str, depth: int, batch_size: int) -> dict:
    cfg = TrainConfig(depth=depth, batch_size=batch_size, precision=precision)
    n = 4 * batch_size
    graph = tf.Graph()
    with graph.as_default():
        t = build_train_graph(cfg, (120.0,) * 3, (60.0,) * 3, n, precision=precision)
        init = tf1.global_variables_initializer()
    rng = np.random.default_rng(0)
    kinds = collections.Counter()
    with tf1.Session(graph=graph, config=session_config()) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                               t.data_labels: rng.integers(0, 10, n, dtype=np.int32)})
        feed = {t.batch_index: 0, t.training: True}
        fetches = loop_fetches(t)
        for _ in range(3):
            sess.run(fetches, feed)
        meta = tf1.RunMetadata()
        sess.run(fetches, feed, options=tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE),
                 run_metadata=meta)
    total = 0
    for dev in meta.step_stats.dev_stats:
        for node in dev.node_stats:
            if node.node_name == "_SOURCE":
                continue
            total += 1
            label = node.timeline_label.split(" = ", 1)[-1]
            kinds[label.split("(", 1)[0].strip() or node.node_name] += 1
    return {"precision": precision, "depth": depth, "batch_size": batch_size, "ops": total,
            "IsFinite": kinds["IsFinite"], "All": kinds["All"],
            "Switch": kinds["Switch"], "Merge": kinds["Merge"], "fetches": len(fetches)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16"],
                        choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    for precision in args.precision:
        r = count_ops(precision, args.depth, args.batch_size)
        print(f"{r['precision']}: depth {r['depth']} batch {r['batch_size']}: {r['ops']} ops per "
              f"step ({r['IsFinite']} IsFinite, {r['All']} All, {r['Switch']} Switch, "
              f"{r['Merge']} Merge), {r['fetches']} fetches")


if __name__ == "__main__":
    main()
