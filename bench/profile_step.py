"""Where a training step's time goes: per-op-type totals from TensorFlow's step stats.

    .venv/bin/python bench/profile_step.py [--precision fp32|bf16] [--steps 5] [--top 15]

Runs ResNet-32 training steps (batch 100, Adam, in-graph data) with
``RunOptions(trace_level=FULL_TRACE)`` and sums the recorded op durations by op type
over ``--steps`` traced steps (after a warm-up). Op durations overlap when the two
inter-op threads run ops side by side, so the shares are of summed op time, not of
wall-clock time; the wall-clock step time is printed too.
"""

import argparse
import collections
import time

import numpy as np

from resnet_graph.config import TrainConfig
from resnet_graph.graph import build_train_graph
from resnet_graph.runtime import load_tensorflow, session_config

tf = load_tensorflow()
tf1 = tf.compat.v1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    cfg = TrainConfig(depth=32, batch_size=100, precision=args.precision)
    n = 1000
    graph = tf.Graph()
    with graph.as_default():
        t = build_train_graph(cfg, (120.0,) * 3, (60.0,) * 3, n, precision=args.precision)
        init = tf1.global_variables_initializer()
    rng = np.random.default_rng(0)
    totals = collections.Counter()
    counts = collections.Counter()
    with tf1.Session(graph=graph, config=session_config()) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                               t.data_labels: rng.integers(0, 10, n, dtype=np.int32)})
        feed = {t.training: True}
        for _ in range(5):
            sess.run(t.train_op, feed)
        start = time.perf_counter()
        for _ in range(args.steps):
            sess.run(t.train_op, feed)
        step_seconds = (time.perf_counter() - start) / args.steps
        options = tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE)
        for _ in range(args.steps):
            meta = tf1.RunMetadata()
            sess.run(t.train_op, feed, options=options, run_metadata=meta)
            for dev in meta.step_stats.dev_stats:
                for node in dev.node_stats:
                    op = node.timeline_label.split("(")[0].split(" = ")[-1].strip() or node.node_name
                    kind = op.split(":")[0] if op else node.node_name
                    totals[kind] += node.all_end_rel_micros
                    counts[kind] += 1
    summed = sum(totals.values())
    print(f"precision {args.precision}: wall-clock {step_seconds * 1000:.1f} ms/step "
          f"({100 / step_seconds:.0f} img/s untraced); summed op time "
          f"{summed / args.steps / 1000:.1f} ms/step")
    print(f"{'op type':<40}{'ms/step':>10}{'share':>8}{'calls/step':>12}")
    for kind, micros in totals.most_common(args.top):
        print(f"{kind:<40}{micros / args.steps / 1000:>10.2f}{micros / summed:>8.1%}"
              f"{counts[kind] / args.steps:>12.0f}")


if __name__ == "__main__":
    main()
