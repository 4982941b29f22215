"""Layers and networks: parameter counts, layer counts, shortcuts, batch norm."""

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import models, ops
from resnet_graph.config import TrainConfig
from resnet_graph.graph import MODEL_SCOPE, build_eval_graph, build_train_graph
from resnet_graph.inspection import model_summary

tf1 = tf.compat.v1

# He et al. 2015, Table 6: trainable parameters of the CIFAR-10 ResNets.
PAPER_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS))
@pytest.mark.parametrize("model", ["original", "preact", "plain"])
def test_parameters_match_the_paper(model, depth):
    s = model_summary(TrainConfig(model=model, depth=depth))
    assert abs(s["params"] - PAPER_PARAMS[depth]) / PAPER_PARAMS[depth] < 0.02
    assert s["conv_layers"] == depth - 1 and s["dense_layers"] == 1
    assert sum(r["params"] for r in s["stages"]) == s["params"]


@pytest.mark.parametrize("model", ["original", "proposed", "cnn"])
def test_depth_32_has_31_convolutions_and_one_dense_layer(model):
    g = tf.Graph()
    with g.as_default():
        build_eval_graph(TrainConfig(model=model), (0,) * 3, (1,) * 3)
    assert models.layer_counts(g) == (31, 1)


@pytest.mark.parametrize("depth", [7, 31, 33, 0])
def test_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        TrainConfig(depth=depth)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_option_a_shortcut_subsamples_and_zero_pads(data_format):
    x = np.arange(2 * 8 * 8 * 4, dtype=np.float32).reshape(2, 8, 8, 4) + 1
    if data_format == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    g = tf.Graph()
    with g.as_default():
        y = ops.shortcut_option_a(tf.constant(x), 8, 2, data_format=data_format)
        assert not [op for op in g.get_operations() if "Pool" in op.type]
        with tf1.Session() as sess:
            out = sess.run(y)
    if data_format == "NCHW":
        out = out.transpose(0, 2, 3, 1)
        x = x.transpose(0, 2, 3, 1)
    assert out.shape == (2, 4, 4, 8)
    np.testing.assert_array_equal(out[..., 2:6], x[:, ::2, ::2, :])
    assert not out[..., :2].any() and not out[..., 6:].any()


def _bn_graph(momentum=0.5):
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 4, 4, 3])
        training = tf1.placeholder_with_default(False, [])
        y = ops.batch_norm(x, training, data_format="NHWC", name="bn", momentum=momentum)
        assert not tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)   # pending until the train op
        updates = ops.moving_statistics_updates(tf1.get_collection(ops.STATISTICS_UPDATES))
        assert updates == tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
        init = tf1.global_variables_initializer()
    return g, x, training, y, updates, init


def test_batch_norm_uses_batch_statistics_when_training_and_moving_averages_otherwise():
    g, x, training, y, updates, init = _bn_graph(momentum=0.5)
    assert len(updates) == 2
    batch = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 4, 3)).astype(np.float32)
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        train_out = sess.run(y, {x: batch, training: True})
        # Batch statistics: each channel of the output has mean 0 and std 1.
        np.testing.assert_allclose(train_out.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(train_out.std(axis=(0, 1, 2)), 1, atol=1e-3)
        # Inference with fresh moving averages (0, 1) is the identity (up to epsilon).
        np.testing.assert_allclose(sess.run(y, {x: batch}), batch / np.sqrt(1 + 1e-5), rtol=1e-5)
        # A training step with the updates moves the averages half way to the batch's.
        sess.run([y] + updates, {x: batch, training: True})
        mean, var = sess.run([v for v in tf1.global_variables(scope="bn") if "moving" in v.name])
        np.testing.assert_allclose(mean, 0.5 * batch.mean(axis=(0, 1, 2)), rtol=1e-4)
        unbiased = batch.reshape(-1, 3).var(axis=0, ddof=1)
        np.testing.assert_allclose(var, 0.5 + 0.5 * unbiased, rtol=1e-3)
        expected = (batch - mean) / np.sqrt(var + 1e-5)
        np.testing.assert_allclose(sess.run(y, {x: batch}), expected, rtol=1e-4, atol=1e-4)


def test_batch_norm_updates_are_under_the_train_op():
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(TrainConfig(depth=8, batch_size=4), (0,) * 3, (1,) * 3, 8)
        updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS, scope=MODEL_SCOPE)
    # 2 assignments per batch norm; depth 8: stem + 3 blocks x 2 batch norms.
    assert len(updates) == 2 * 7
    # Every update op is an ancestor of the train op.
    ancestors, stack = set(), [t.train_op]
    while stack:
        op = stack.pop()
        if op in ancestors:
            continue
        ancestors.add(op)
        stack.extend(i.op for i in op.inputs)
        stack.extend(op.control_inputs)
    assert all(u.op in ancestors if hasattr(u, "op") else u in ancestors for u in updates)


@pytest.mark.parametrize("model", ["original", "preact", "plain"])
def test_eval_logits_of_an_image_do_not_depend_on_its_batch(model):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(TrainConfig(model=model, depth=8, batch_size=7), (120,) * 3,
                              (60,) * 3, 7)
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        labels = np.zeros(7, np.int32)
        sess.run(t.load_data, {t.data_images: images, t.data_labels: labels})
        sess.run(t.train_op, {t.training: True})  # moving averages away from (0, 1)
        together = sess.run(t.logits, {t.images: images})
        alone = np.concatenate([sess.run(t.logits, {t.images: images[i:i + 1]}) for i in range(7)])
        # The training flag defaults to False: inference mode unless asked.
        default = sess.run(t.logits, {t.images: images})
    np.testing.assert_allclose(alone, together, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(default, together)


def test_two_models_live_in_one_graph():
    g = tf.Graph()
    with g.as_default():
        x = tf.zeros([1, 32, 32, 3])
        with tf1.variable_scope("a"):
            models.build_logits("original", x, False, depth=8)
        with tf1.variable_scope("b"):
            models.build_logits("preact", x, False, depth=8)
        names = [v.op.name for v in tf1.global_variables()]
    assert any(n.startswith("a/") for n in names) and any(n.startswith("b/") for n in names)
    assert len(names) == len(set(names))


# -- issue 17: initialisation, stride-2 padding, zero-initialised residual branches ------------
def _initial_variables(cfg):
    """Name -> initial value of every model variable of ``cfg``'s inference graph."""
    g = tf.Graph()
    with g.as_default():
        build_eval_graph(cfg, (0,) * 3, (1,) * 3)
        variables = tf1.global_variables(MODEL_SCOPE)
        init = tf1.global_variables_initializer()
        with tf1.Session(graph=g) as sess:
            sess.run(init)
            return dict(zip([v.op.name for v in variables], sess.run(variables)))


def _kernels(values):
    return {n: v for n, v in values.items() if n.endswith("/kernel")}


def test_he_init_draws_kernels_with_variance_2_over_fan_in():
    values = _kernels(_initial_variables(TrainConfig(depth=20, init="he")))
    assert len(values) == 20   # 19 convolutions and the dense layer
    for name, w in values.items():
        fan_in = int(np.prod(w.shape[:-1]))
        expected = 2.0 / fan_in
        # The sample variance of N normal draws has a relative standard error of
        # sqrt(2 / (N - 1)); allow 5 of them (the stem's 432 weights: 34%).
        tolerance = 5 * np.sqrt(2.0 / (w.size - 1))
        assert abs(w.var() / expected - 1) < tolerance, (name, w.var(), expected)
        assert abs(w.mean()) < 5 * np.sqrt(expected / w.size), name
    # Untruncated: a truncated normal (TensorFlow's "normal") has nothing beyond 2 sigma.
    big = values["model/stage3/block3/conv2/kernel"]
    assert np.mean(np.abs(big) > 2 * np.sqrt(2.0 / (9 * 64))) > 0.03


def test_glorot_stays_the_default_initialisation():
    values = _kernels(_initial_variables(TrainConfig(depth=8)))
    for name, w in values.items():
        fan_in, fan_out = int(np.prod(w.shape[:-1])), int(np.prod(w.shape[:-2])) * w.shape[-1]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit, name
        assert abs(w.var() / (limit ** 2 / 3) - 1) < 5 * np.sqrt(2.0 / (w.size - 1)), name
    assert TrainConfig().init == "glorot" and TrainConfig().stride_padding == "same"


def _strided_delta_conv(x, stride_padding):
    """A stride-2 3x3 convolution whose kernel passes each channel's centre pixel."""
    channels = x.shape[-1]
    delta = np.zeros((3, 3, channels, channels), np.float32)
    delta[1, 1, np.arange(channels), np.arange(channels)] = 1.0
    g = tf.Graph()
    with g.as_default():
        y = ops.conv2d(tf.constant(x), channels, 3, 2, data_format="NHWC", name="c",
                       stride_padding=stride_padding)
        shortcut = ops.shortcut_option_a(tf.constant(x), channels, 2, data_format="NHWC")
        kernel = tf1.global_variables()[0]
        with tf1.Session(graph=g) as sess:
            sess.run(kernel.assign(delta))
            return sess.run([y, shortcut])


@pytest.mark.parametrize("size", [32, 16, 8])
def test_symmetric_stride_2_picks_the_pixels_the_shortcut_keeps(size):
    x = np.random.default_rng(size).normal(size=(2, size, size, 4)).astype(np.float32)
    y, shortcut = _strided_delta_conv(x, "symmetric")
    assert y.shape == shortcut.shape == (2, size // 2, size // 2, 4)
    np.testing.assert_array_equal(y, shortcut)
    np.testing.assert_array_equal(y, x[:, ::2, ::2, :])


@pytest.mark.parametrize("size", [32, 16, 8])
def test_same_stride_2_is_half_a_pixel_off_the_shortcut(size):
    x = np.random.default_rng(size).normal(size=(2, size, size, 4)).astype(np.float32)
    y, shortcut = _strided_delta_conv(x, "same")
    assert y.shape == shortcut.shape
    assert not np.allclose(y, shortcut)
    # TensorFlow's SAME pads 0 rows on top and 1 at the bottom: centre 2i + 1.
    np.testing.assert_array_equal(y, x[:, 1::2, 1::2, :])


@pytest.mark.parametrize("stride_padding", ["symmetric", "same"])
def test_nchw_stride_2_padding_in_the_graph(stride_padding):
    """NCHW without running an NCHW convolution on the CPU: the graph's ops."""
    g = tf.Graph()
    with g.as_default():
        x = tf1.placeholder(tf.float32, [None, 4, 32, 32])
        y = ops.conv2d(x, 8, 3, 2, data_format="NCHW", name="s2", stride_padding=stride_padding)
        ops.conv2d(x, 8, 3, 1, data_format="NCHW", name="s1", stride_padding=stride_padding)
        assert y.shape.as_list() == [None, 8, 16, 16]
        convs = {op.name.split("/")[0]: op for op in g.get_operations() if op.type == "Conv2D"}
        pads = [op for op in g.get_operations() if op.type == "Pad"]
        assert all(op.get_attr("data_format") == b"NCHW" for op in convs.values())
        assert convs["s1"].get_attr("padding") == b"SAME"   # stride 1: symmetric already
        if stride_padding == "same":
            assert not pads and convs["s2"].get_attr("padding") == b"SAME"
        else:
            assert convs["s2"].get_attr("padding") == b"VALID"
            assert len(pads) == 1 and pads[0].name.startswith("s2/")
            assert pads[0].outputs[0] is convs["s2"].inputs[0]
            paddings = tf.get_static_value(pads[0].inputs[1])
            np.testing.assert_array_equal(paddings, [[0, 0], [0, 0], [1, 1], [1, 1]])


@pytest.mark.parametrize("model", ["original", "preact", "plain"])
@pytest.mark.parametrize("depth", [20, 32])
def test_new_options_leave_the_parameters_unchanged(model, depth):
    base = model_summary(TrainConfig(model=model, depth=depth))
    changed = model_summary(TrainConfig(model=model, depth=depth, init="he",
                                        stride_padding="symmetric", ema_decay=0.999,
                                        zero_init_residual=model != "plain"))
    assert changed == base
    assert abs(base["params"] - PAPER_PARAMS[depth]) / PAPER_PARAMS[depth] < 0.02


# depth 14: two blocks per stage; the first of stages 2 and 3 pads the shortcut
# (16 -> 32 channels: 8..23 carry the input; 32 -> 64: 16..47).
CARRIED = {"stage2/block1": (8, 24), "stage3/block1": (16, 48)}


def _carried_mask(name, channels):
    """True for the output channels of ``name``'s block that the shortcut carries."""
    lo, hi = next((r for block, r in CARRIED.items() if f"/{block}/" in name), (0, channels))
    mask = np.zeros(channels, bool)
    mask[lo:hi] = True
    return mask


def test_shortcut_channels_are_the_ones_option_a_does_not_pad():
    assert ops.shortcut_channels(16, 16) == (0, 16)
    assert ops.shortcut_channels(16, 32) == (8, 24)
    assert ops.shortcut_channels(32, 64) == (16, 48)
    x = np.arange(2 * 4 * 4 * 16, dtype=np.float32).reshape(2, 4, 4, 16) + 1
    g = tf.Graph()
    with g.as_default():
        y = ops.shortcut_option_a(tf.constant(x), 32, 2, data_format="NHWC")
        with tf1.Session(graph=g) as sess:
            out = sess.run(y)
    carried = out[..., 8:24]
    assert (carried == x[:, ::2, ::2, :]).all()
    assert not out[..., :8].any() and not out[..., 24:].any()


def test_zero_init_residual_zeroes_the_last_batch_norm_of_original_blocks():
    values = _initial_variables(TrainConfig(model="original", depth=14, zero_init_residual=True))
    gammas = {n: v for n, v in values.items() if n.endswith("/gamma")}
    assert len(gammas) == 1 + 3 * 2 * 2
    for name, gamma in gammas.items():
        if name.endswith("/bn2/gamma"):
            carried = _carried_mask(name, len(gamma))
            assert not gamma[carried].any(), name
            assert (gamma[~carried] == 1).all(), name   # the padded channels start at 1
        else:
            assert (gamma == 1).all(), name
    assert sum(not m.all() for m in (_carried_mask(n, len(v)) for n, v in gammas.items()
                                     if n.endswith("/bn2/gamma"))) == 2
    assert all(w.any() for w in _kernels(values).values())
    default = _initial_variables(TrainConfig(model="original", depth=14))
    assert all((v == 1).all() for n, v in default.items() if n.endswith("/gamma"))


def test_zero_init_residual_zeroes_the_last_convolution_of_preact_blocks():
    values = _initial_variables(TrainConfig(model="preact", depth=14, zero_init_residual=True))
    for name, w in _kernels(values).items():
        if name.endswith("/conv2/kernel"):
            carried = _carried_mask(name, w.shape[-1])
            assert not w[..., carried].any(), name
            assert all(w[..., c].any() for c in np.flatnonzero(~carried)), name
        else:
            assert w.any(), name
    assert sum(n.endswith("/conv2/kernel") for n in values) == 6
    assert all((v == 1).all() for n, v in values.items() if n.endswith("/gamma"))


def test_a_zero_gamma_in_front_of_relu_would_never_learn():
    """Why preact zeroes its last kernel, not bn2's gamma: BN(gamma 0, beta 0) outputs
    exactly 0, ReLU passes no gradient at 0, so gamma and beta get none either."""
    g = tf.Graph()
    with g.as_default():
        x = tf.constant(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), tf.float32)
        y = tf.nn.relu(ops.batch_norm(x, True, data_format="NHWC", name="bn",
                                       zero_channels=(0, 3)))
        loss = tf.reduce_sum(ops.conv2d(y, 3, data_format="NHWC", name="conv") ** 2 + y)
        variables = tf1.trainable_variables()
        grads = tf.gradients(loss, variables)
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            values = sess.run(grads)
    assert all(not v.any() for v in values)


@pytest.mark.parametrize("model, last", [("original", "bn2/gamma"),
                                         ("preact", "conv2/kernel")])
def test_zero_initialised_branches_start_as_the_identity_and_learn(model, last):
    """Every channel of every zero-initialised layer moves, the padded channels of
    the downsampling blocks included: a first version zeroed those too, and they
    never moved (0 before a ReLU, or a constant 0 into every later batch norm)."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    cfg = TrainConfig(model=model, depth=8, batch_size=8, optimizer="momentum", lr=0.1,
                      zero_init_residual=True)
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, (120,) * 3, (60,) * 3, 8)
        init = tf1.global_variables_initializer()
        blocks = ("stage1/block1", "stage2/block1", "stage3/block1")
        names = {v.op.name: v for v in tf1.global_variables()}
        layers = [names[f"{MODEL_SCOPE}/{b}/{last}"] for b in blocks]
        block = g.get_tensor_by_name(f"{MODEL_SCOPE}/stage1/block1/add:0")
        shortcut_in = g.get_tensor_by_name(f"{MODEL_SCOPE}/stem/Relu:0")
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        sess.run(t.load_data, {t.data_images: images, t.data_labels: labels})
        out, identity = sess.run([block, shortcut_in], {t.training: True})
        np.testing.assert_allclose(out, identity, atol=1e-6)   # branch + shortcut = shortcut
        before = sess.run(layers)
        assert not before[0].any()
        for _ in range(2):
            sess.run(t.train_op, {t.training: True})
        after = sess.run(layers)
    for name, b, a in zip(blocks, before, after):
        changed = (a != b).reshape(-1, a.shape[-1]).any(axis=0)   # per output channel
        assert changed.all(), (name, np.flatnonzero(~changed))


def test_zero_init_residual_is_refused_for_plain():
    with pytest.raises(ValueError, match="plain has no shortcut"):
        TrainConfig(model="plain", zero_init_residual=True)
