"""Mixed precision on the CPU: fp16/bf16 graphs, float32 master weights, loss scaling."""

import numpy as np
import pytest
import tensorflow as tf

from resnet_graph import precision as policy
from resnet_graph.config import TrainConfig
from resnet_graph.errors import UserError
from resnet_graph.graph import MODEL_SCOPE, build_train_graph

tf1 = tf.compat.v1


def all_nodes(graph):
    """NodeDefs of the graph and of its functions (tf.cond branches live there)."""
    gd = graph.as_graph_def()
    nodes = list(gd.node)
    for f in gd.library.function:
        nodes.extend(f.node_def)
    return nodes


def _session(precision, data_format="NHWC", n=20, model="original", batch_size=10):
    cfg = TrainConfig(model=model, depth=8, batch_size=batch_size, lr=0.01)
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, (120,) * 3, (60,) * 3, n, precision=precision,
                              data_format=data_format)
        init = tf1.global_variables_initializer()
        weights = tf1.trainable_variables(MODEL_SCOPE)
    sess = tf1.Session(graph=g)
    sess.run(init)
    rng = np.random.default_rng(0)
    sess.run(t.load_data, {t.data_images: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                           t.data_labels: rng.integers(0, 10, n, dtype=np.int32)})
    return sess, t, weights


@pytest.mark.parametrize("precision,dtype", [("fp16", tf.float16), ("bf16", tf.bfloat16)])
def test_low_precision_convolutions_with_float32_weights_and_statistics(precision, dtype):
    sess, t, weights = _session(precision)
    with sess:
        g = sess.graph
        convs = [op for op in g.get_operations() if op.type == "Conv2D"]
        assert convs and all(op.get_attr("T") == dtype for op in convs)
        bns = [n for n in all_nodes(g) if n.op.startswith("FusedBatchNorm")]
        assert bns and all(n.attr["U"].type == tf.float32.as_datatype_enum for n in bns)
        assert all(n.attr["T"].type == dtype.as_datatype_enum for n in bns)
        assert all(v.dtype.base_dtype == tf.float32 for v in weights)
        before = sess.run(weights)
        loss = sess.run([t.train_op, t.loss], {t.training: True})[1]
        assert np.isfinite(loss) and t.logits.dtype == tf.float32
        after = sess.run(weights)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_fp16_loss_scaling_skips_overflowing_steps_and_recovers():
    # fp16 kernels are slow on a CPU: a batch of 2 keeps the ~20 steps below short.
    sess, t, weights = _session("fp16", batch_size=2)
    with sess:
        assert t.loss_scale is not None
        scale0 = sess.run(t.loss_scale)
        # A finite step: applied, scale kept.
        sess.run(t.train_op, {t.training: True})
        assert sess.run([t.global_step, t.skipped_steps]) == [1, 0]
        assert sess.run(t.loss_scale) == scale0
        # Force an overflow: with a huge scale the fp16 gradients become inf.
        sess.run(t.loss_scale.assign(3e38))
        before = sess.run(weights + [t.global_step])
        sess.run(t.train_op, {t.training: True})
        after = sess.run(weights + [t.global_step])
        for a, b in zip(before, after):
            np.testing.assert_array_equal(a, b)          # nothing applied
        assert sess.run(t.skipped_steps) == 1
        assert sess.run(t.loss_scale) == pytest.approx(1.5e38, rel=1e-6)   # halved
        # From a scale that still overflows, skipping halves it until steps apply again.
        sess.run(t.loss_scale.assign(2.0 ** 30))
        for _ in range(40):
            sess.run(t.train_op, {t.training: True})
            if sess.run(t.global_step) > 1:
                break
        assert sess.run(t.global_step) == 2
        assert sess.run(t.skipped_steps) > 1 and sess.run(t.loss_scale) < 2.0 ** 30
        assert all(np.isfinite(w).all() for w in sess.run(weights))


def test_no_loss_scaling_outside_fp16():
    for precision in ("fp32", "bf16"):
        sess, t, _ = _session(precision)
        with sess:
            assert t.loss_scale is None
            assert not [op for op in sess.graph.get_operations() if "loss_scaling" in op.name]


def _needs_kernel(data_format, precision, xla=False):
    """Skip, with TensorFlow's reason, where this machine has no such kernel."""
    problem = policy.kernel_problem(data_format, precision, xla)
    if problem:
        pytest.skip(f"no {data_format}/{precision}{'/XLA' if xla else ''} kernel here: {problem}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_layout_is_threaded_through_every_op(precision):
    """Graph structure only (runs on every machine, kernels or not)."""
    for fmt in ("NHWC", "NCHW"):
        g = tf.Graph()
        with g.as_default():
            cfg = TrainConfig(model="preact", depth=8, batch_size=10, lr=0.01)
            build_train_graph(cfg, (120,) * 3, (60,) * 3, 20, precision=precision,
                              data_format=fmt)
        ops_ = g.get_operations()
        convs = [op for op in ops_ if op.type == "Conv2D"]
        assert convs and all(op.get_attr("data_format") == fmt.encode() for op in convs)
        # (TensorFlow's gradient of an inference-mode fused batch norm, in the
        # never-run branch of the training flag, is NHWC whatever the input.)
        bns = [n for n in all_nodes(g) if n.op.startswith("FusedBatchNorm")
               and not n.name.startswith("gradients")]
        assert bns and all(n.attr["data_format"].s == fmt.encode() for n in bns)
        # One transpose at the input for NCHW, none for NHWC.
        transposes = [op for op in ops_ if op.type == "Transpose"
                      and not op.name.startswith("gradients")]
        assert len(transposes) == (1 if fmt == "NCHW" else 0)


def _one_step(cfg, precision="fp32", data_format="NHWC", n=8, initial=None, seed=0):
    """Build ``cfg``'s training graph, load ``initial`` weights into it (by default its
    seeded initialisation: under XLA the compiled initialisers round differently), feed
    n random images (drawn with ``seed``), and return the initial weights, the loss,
    logits and gradients of total_loss on the first batch, the input of every ReLU of
    the model on that batch (``pre_relu``: op name -> NHWC array), and the weights and
    batch-norm statistics after one training step."""
    g = tf.Graph()
    with g.as_default():
        t = build_train_graph(cfg, (120,) * 3, (60,) * 3, n, precision=precision,
                              data_format=data_format)
        weights = tf1.trainable_variables(MODEL_SCOPE)
        stats = [v for v in tf1.global_variables(MODEL_SCOPE) if "moving_" in v.op.name]
        grads = tf.gradients(t.total_loss, weights)
        relus = [op for op in g.get_operations()
                 if op.type == "Relu" and op.name.startswith(MODEL_SCOPE + "/")]
        init = tf1.global_variables_initializer()
    with tf1.Session(graph=g) as sess:
        sess.run(init)
        for variable, value in zip(weights, initial or ()):
            variable.load(value, sess)
        rng = np.random.default_rng(seed)
        sess.run(t.load_data, {t.data_images: rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                               t.data_labels: rng.integers(0, 10, n, dtype=np.int32)})
        feed = {t.batch_index: 0, t.training: True}
        before = sess.run(weights)
        loss, logits, gradients, pre_relu = sess.run(
            [t.loss, t.logits, grads, [op.inputs[0] for op in relus]], feed)
        sess.run(t.train_op, feed)
        after, statistics = sess.run([weights, stats])
    if data_format == "NCHW":
        pre_relu = [np.transpose(v, (0, 2, 3, 1)) for v in pre_relu]
    names = [v.op.name for v in weights]
    return dict(names=names, before=before, loss=loss, logits=logits, grads=gradients,
                pre_relu=dict(zip([op.name for op in relus], pre_relu)),
                after=after, stats=statistics, compiled=any(
                    "_XlaCompile" in op.node_def.attr for op in g.get_operations()))


# Entries whose ReLU input is below this (in units of its batch-normalised scale, about 1)
# may take either sign in either layout: float32 puts them within rounding of zero.
RELU_TIE = 1e-5


def _relu_ties(a, b):
    """The ReLU inputs whose sign differs between the runs ``a`` and ``b``, as
    (op name, index, value in a, value in b)."""
    ties = []
    for name, x in a["pre_relu"].items():
        y = b["pre_relu"][name]
        for index in np.argwhere((x > 0) != (y > 0)):
            index = tuple(index)
            ties.append((name, index, float(x[index]), float(y[index])))
    return ties


def _layout_pair(cfg, precision, tries=4):
    """NHWC's and NCHW's one step on the first batch of random images on which every
    ReLU input has the same sign in both layouts.

    fp32 gradients are only comparable across layouts where every ReLU takes the same
    branch: the two layouts sum in different orders, so their pre-activations differ by
    float32 rounding (about 1e-6), and an entry within that of zero can be negative in one
    and positive in the other. Its ReLU then passes the gradient in one layout and blocks
    it in the other; the batch norm before spreads the difference over its channel, and
    every gradient further back inherits it. Measured (issue 26, TensorFlow 2.21 with
    oneDNN, the first batch of seed 0): preact's stage2/block1/bn1 output at image 1,
    row 26, column 1, channel 12 is -3.9e-8 in NHWC and +3.9e-7 in NCHW (+8.9e-7 in a
    float64 recomputation: NCHW has the exact sign); that single entry's upstream gradient
    (-1.25e-4) was 10% of the largest gradient at bn1's output, and the weight gradients
    of stage 1 and the stem differed by up to 1.6%. Any such tie must be within RELU_TIE of
    zero in both layouts; then the next batch is drawn. bf16 (many ties at its own
    rounding) is compared on the first batch, against its own tolerance."""
    for seed in range(tries if precision == "fp32" else 1):
        nhwc, nchw = (_one_step(cfg, precision, fmt, seed=seed) for fmt in ("NHWC", "NCHW"))
        ties = _relu_ties(nhwc, nchw) if precision == "fp32" else []
        for name, index, x, y in ties:
            assert max(abs(x), abs(y)) < RELU_TIE, (name, index, x, y)
        if not ties:
            return nhwc, nchw, seed
    pytest.fail(f"every one of {tries} batches had a ReLU input within rounding of zero")


def test_a_relu_tie_between_layouts_is_found():
    """_layout_pair's check, on the measured tie: one input of opposite signs (and -0.0
    against 0.0, both blocked by ReLU, is no tie)."""
    x = np.array([[1.0, -3.8650484e-08, 0.0]], np.float32)
    y = np.array([[1.0, 3.8650484e-07, -0.0]], np.float32)
    ties = _relu_ties({"pre_relu": {"r": x}}, {"pre_relu": {"r": y}})
    assert ties == [("r", (0, 1), float(x[0, 1]), float(y[0, 1]))]
    assert _relu_ties({"pre_relu": {"r": x}}, {"pre_relu": {"r": x}}) == []


@pytest.mark.parametrize("precision, model", [
    ("fp32", "original"), ("fp32", "preact"),
    # bf16's own rounding (below) is larger than the layouts' fp32 difference.
    ("bf16", "original"), ("bf16", "preact")])
def test_nchw_graph_trains_and_matches_nhwc(precision, model):
    """The same network in NCHW and NHWC (same initial weights): the same loss, logits,
    input of every ReLU, gradient of every variable, and weights and batch-norm
    statistics after a step."""
    _needs_kernel("NCHW", precision)
    cfg = TrainConfig(model=model, depth=8, batch_size=8, optimizer="momentum", lr=0.1)
    nhwc, nchw, seed = _layout_pair(cfg, precision)
    for a, b in zip(nhwc["before"], nchw["before"]):
        np.testing.assert_array_equal(a, b)
    # bf16 rounds each activation to 8 bits of mantissa, in a different order per layout.
    tol = 1e-4 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(nchw["loss"], nhwc["loss"], rtol=tol, atol=tol)
    np.testing.assert_allclose(nchw["logits"], nhwc["logits"], rtol=tol, atol=tol)
    for name, a in nhwc["pre_relu"].items():
        np.testing.assert_allclose(nchw["pre_relu"][name], a, rtol=tol, atol=tol, err_msg=name)
    # Gradients: NCHW's distance from NHWC at most 1e-4 of the gradient's norm (fp32), or
    # (bf16, whose gradients sum a batch's pixels in 8-bit mantissas, in another order
    # per layout) at most twice bf16's own distance from the fp32 gradient.
    exact = (_one_step(cfg, "fp32", "NHWC", seed=seed)["grads"] if precision == "bf16"
             else nhwc["grads"])
    for name, a, b, c in zip(nhwc["names"], nhwc["grads"], nchw["grads"], exact):
        limit = max(1e-4 * np.linalg.norm(a), 2 * np.linalg.norm(a - c))
        assert np.linalg.norm(b - a) <= limit, name
    for name, a, b in zip(nhwc["names"], nhwc["after"], nchw["after"]):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * 1e-1, err_msg=name)
    for a, b in zip(nhwc["stats"], nchw["stats"]):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol * 1e-1)


def test_a_setting_without_a_kernel_is_refused_with_the_reason_and_the_alternative(
        monkeypatch):
    missing = "The Conv2D op currently only supports the NHWC tensor format on the CPU."
    monkeypatch.setattr(policy, "kernel_problem",
                        lambda fmt, precision, xla=False: missing if fmt == "NCHW" else None)
    with pytest.raises(UserError) as info:
        policy.check_runnable("fp32", "NCHW", False)
    message = str(info.value)
    assert "--data-format NCHW" in message and missing in message
    assert "use --data-format NHWC" in message and "\n" not in message
    policy.check_runnable("fp32", "NHWC", False)       # the alternative passes
    monkeypatch.setattr(policy, "kernel_problem",
                        lambda fmt, precision, xla=False: "no XLA here" if xla else None)
    with pytest.raises(UserError, match="drop --xla"):
        policy.check_runnable("fp32", "NHWC", True)


def test_the_kernel_probe_answers_for_the_baseline_and_gives_a_reason_otherwise():
    assert policy.kernel_problem("NHWC", "fp32") is None
    for fmt in ("NHWC", "NCHW"):
        problem = policy.kernel_problem(fmt, "fp32", False)
        assert problem is None or (isinstance(problem, str) and problem
                                   and not problem.startswith("Graph execution error"))


def test_auto_precision_and_layout_per_device():
    assert policy.resolve_precision("auto", gpu=True) == "fp16"
    # bf16 on CPUs with bf16 units, where it kept accuracy (docs/results.md).
    assert policy.resolve_precision("auto", gpu=False, bf16_units=True, onednn=True) == "bf16"
    assert policy.resolve_precision("auto", gpu=False, bf16_units=False, onednn=True) == "fp32"
    # Without oneDNN bf16 is emulated (about 9x slower than fp32): never auto.
    assert policy.resolve_precision("auto", gpu=False, bf16_units=True, onednn=False) == "fp32"
    assert policy.resolve_precision("auto", gpu=True, bf16_units=True) == "fp16"
    assert policy.resolve_precision("bf16", gpu=False) == "bf16"
    assert policy.resolve_precision("fp16", gpu=False) == "fp16"
    assert policy.resolve_data_format("auto", gpu=False) == "NHWC"
    assert policy.resolve_data_format("auto", gpu=True, precision="fp32") == "NCHW"
    assert policy.resolve_data_format("auto", gpu=True, precision="fp16") == "NHWC"
    assert policy.resolve_data_format("NCHW", gpu=False) == "NCHW"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_needless_casts_or_transposes_in_the_step(precision):
    sess, t, weights = _session(precision)
    with sess:
        forward = [op for op in sess.graph.get_operations()
                   if not op.name.startswith(("gradients", "Adam", "input/", "epoch_sums/"))]
        casts = [op for op in forward if op.type == "Cast"]
        kernel_casts = [op for op in casts if op.inputs[0].op.type == "ReadVariableOp"]
        assert not [op for op in forward if op.type == "Transpose"]
        if precision == "fp32":
            # uint8 -> float32 input, logits, correct; nothing per layer.
            assert not kernel_casts and len(casts) <= 4, [op.name for op in casts]
        else:
            # One cast per conv kernel (float32 master -> bf16); the dense layer is float32;
            # plus the input, the pooled features and the logits.
            n_kernels = len([w for w in weights if w.op.name.endswith("/kernel")
                             and "dense" not in w.op.name])
            assert len(kernel_casts) == n_kernels
            assert len(casts) - len(kernel_casts) <= 5, [op.name for op in casts]


def test_xla_step_runs_and_agrees_with_the_plain_step():
    """One compiled training step (momentum SGD, lr 0.1) leaves every weight and batch-norm
    statistic within 1e-5 + 1e-4 relative of the plain step's, and every weight moved
    by more than that (so the comparison sees the update)."""
    _needs_kernel("NHWC", "fp32", xla=True)
    plain = _one_step(TrainConfig(depth=8, batch_size=4, optimizer="momentum", lr=0.1))
    compiled = _one_step(TrainConfig(depth=8, batch_size=4, xla=True, optimizer="momentum",
                                     lr=0.1), initial=plain["before"])
    assert not plain["compiled"] and compiled["compiled"]
    for a, b in zip(plain["before"], compiled["before"]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(compiled["loss"], plain["loss"], rtol=1e-5)
    for name, start, a, b in zip(plain["names"], plain["before"], plain["after"],
                                 compiled["after"]):
        assert np.abs(a - start).max() > 1e-3, f"{name} did not move"
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    for a, b in zip(plain["stats"], compiled["stats"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
