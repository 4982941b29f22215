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
