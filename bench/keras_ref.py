"""Reference timing: the same ResNet-32 as a Keras 3 functional model, trained with fit().

Run with the project's interpreter (TensorFlow backend):

    .venv/bin/python bench/keras_ref.py --steps 60 --warmup 10 --precision bf16 --json

The network is resnet-graph's "original" ResNet-32 for CIFAR-10 (post-activation,
option A shortcuts, 464,154 trainable parameters). fit() reads 5,000 random images
held in memory (a tf.data pipeline over in-memory tensors, batch 100) for
``warmup + steps`` batches in one epoch; a callback stamps the end of every batch,
and images/s is taken over the ``steps`` batches after the warm-up ones.
"""

import json
import os
import sys
import time

from common import (
    EXPECTED_PARAMS,
    NUM_CLASSES,
    STAGE_FILTERS,
    check_training_args,
    cpu_name,
    training_parser,
)

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = training_parser(__doc__.split("\n\n")[0])
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA "
                   "(jit_compile=True); off by default, like resnet-graph bench")
    p.add_argument("--num-images", type=int, default=5000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return check_training_args(p, p.parse_args(argv))


def build_model(keras, depth):
    """ResNet-(6n+2), original post-activation blocks, option A shortcuts, NHWC."""
    layers, ops = keras.layers, keras.ops
    n = (depth - 2) // 6

    class ShortcutA(layers.Layer):
        """x[:, ::s, ::s, :] zero-padded in channels (half before, half after) to ``filters``."""

        def __init__(self, filters, strides, **kwargs):
            super().__init__(**kwargs)
            self.filters, self.strides = filters, strides

        def call(self, x):
            if self.strides > 1:
                x = x[:, ::self.strides, ::self.strides, :]
            extra = self.filters - x.shape[-1]
            if extra:
                x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
            return x

        def compute_output_shape(self, shape):
            b, h, w, _ = shape
            s = self.strides
            return (b, None if h is None else -(-h // s), None if w is None else -(-w // s),
                    self.filters)

    def conv(filters, strides, name):
        return layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                             kernel_initializer="glorot_uniform", name=name)

    def bn(name):
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)

    inputs = keras.Input((32, 32, 3), name="images")
    x = conv(STAGE_FILTERS[0], 1, "stem_conv")(inputs)
    x = bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    in_filters = STAGE_FILTERS[0]
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, n + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            name = f"s{stage}b{block}"
            y = conv(filters, strides, f"{name}_conv1")(x)
            y = bn(f"{name}_bn1")(y)
            y = layers.ReLU(name=f"{name}_relu1")(y)
            y = conv(filters, 1, f"{name}_conv2")(y)
            y = bn(f"{name}_bn2")(y)
            if strides > 1 or filters != in_filters:
                x = ShortcutA(filters, strides, name=f"{name}_shortcut")(x)
            x = layers.Add(name=f"{name}_add")([x, y])
            x = layers.ReLU(name=f"{name}_relu2")(x)
            in_filters = filters
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    logits = layers.Dense(NUM_CLASSES, kernel_initializer="glorot_uniform", name="logits")(x)
    return keras.Model(inputs, logits, name=f"resnet{depth}_original")


def main(argv=None):
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    if args.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(args.seed)

    model = build_model(keras, args.depth)
    params = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    if args.depth == 32:
        assert params == EXPECTED_PARAMS, \
            f"{params} trainable parameters, expected {EXPECTED_PARAMS}"
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=args.xla)

    rng = np.random.default_rng(args.seed)
    num_images = max(args.num_images, args.batch_size)
    images = rng.standard_normal((num_images, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, num_images).astype(np.int32)
    data = (tf.data.Dataset.from_tensor_slices((images, labels))
            .batch(args.batch_size, drop_remainder=True).repeat()
            .prefetch(tf.data.AUTOTUNE))

    class BatchClock(keras.callbacks.Callback):
        """Stamps the end of every training batch (the logs are fetched by then, so the
        step has finished)."""

        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    clock = BatchClock()
    model.fit(data, epochs=1, steps_per_epoch=args.warmup + args.steps, callbacks=[clock],
              shuffle=False, verbose=0)
    assert len(clock.ends) == args.warmup + args.steps, len(clock.ends)
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1]
    result = {
        "framework": "keras",
        "framework_version": f"keras {keras.__version__}, tensorflow {tf.__version__}",
        "model": "original", "depth": args.depth, "batch_size": args.batch_size,
        "precision": args.precision, "data_format": "NHWC", "xla": bool(args.xla),
        "device": (f"GPU: {tf.config.list_physical_devices('GPU')[0].name}"
                   if tf.config.list_physical_devices("GPU")
                   else f"CPU: {cpu_name()} ({os.cpu_count()} cores)"),
        "params": params, "steps": args.steps, "warmup": args.warmup, "seconds": seconds,
        "images_per_sec": args.steps * args.batch_size / seconds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"keras original-{args.depth} batch {args.batch_size} {args.precision}: "
              f"{result['images_per_sec']:.1f} images/s ({params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
