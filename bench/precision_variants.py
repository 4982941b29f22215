"""How to get bf16 on a CPU: resnet-graph's explicit casts vs TensorFlow's oneDNN rewrite.

    .venv/bin/python bench/precision_variants.py [--steps 40] [--warmup 8]

Times ResNet-32 training steps (batch 100, Adam, in-graph data) three ways, one after the
other in this process: fp32; bf16 by resnet-graph's explicit casts (``--precision bf16``:
float32 master weights cast per layer, float32 batch-norm statistics); and the fp32 graph
with grappler's ``auto_mixed_precision_onednn_bfloat16`` rewrite, which picks the bf16 ops
itself. Not a test: a measurement that decided how ``--precision bf16`` is built.
"""

import argparse
import time

import numpy as np
from tensorflow.core.protobuf import rewriter_config_pb2

from resnet_graph.config import TrainConfig
from resnet_graph.graph import build_train_graph
from resnet_graph.runtime import load_tensorflow, session_config

tf = load_tensorflow()
tf1 = tf.compat.v1


def images_per_sec(precision, rewrite, steps, warmup, n=2000):
    cfg = TrainConfig(depth=32, batch_size=100)
    graph = tf.Graph()
    with graph.as_default():
        t = build_train_graph(cfg, (120.0,) * 3, (60.0,) * 3, n, precision=precision)
        init = tf1.global_variables_initializer()
    config = session_config()
    if rewrite:
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = (
            rewriter_config_pb2.RewriterConfig.ON)
    rng = np.random.default_rng(0)
    with tf1.Session(graph=graph, config=config) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                               t.data_labels: rng.integers(0, 10, n, dtype=np.int32)})
        per_epoch = n // cfg.batch_size
        for i in range(warmup):
            sess.run(t.train_op, {t.batch_index: i % per_epoch, t.training: True})
        start = time.perf_counter()
        for i in range(steps):
            sess.run(t.train_op, {t.batch_index: i % per_epoch, t.training: True})
        return steps * cfg.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    for name, precision, rewrite in (("fp32", "fp32", False),
                                     ("bf16, explicit casts (resnet-graph)", "bf16", False),
                                     ("bf16, oneDNN auto-mixed-precision rewrite", "fp32", True)):
        print(f"{name:<45} {images_per_sec(precision, rewrite, args.steps, args.warmup):7.1f} img/s")


if __name__ == "__main__":
    main()
