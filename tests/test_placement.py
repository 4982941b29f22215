"""Where the training graph puts its ops when GPUs are visible, proven on a CPU.

TensorFlow is made to report fake GPUs; each trainer (one process, towers, one
task of a cluster) builds its graph, and the device asked for by every op is
checked. No session is opened on these graphs (their GPUs do not exist).
"""

import pytest
import tensorflow as tf
from fake_gpus import fake_gpus

from resnet_graph import data, launch, replicate
from resnet_graph.config import TrainConfig
from resnet_graph.distributed import DistributedTrainer, parse_cluster
from resnet_graph.probes import attach_gradient_probe
from resnet_graph.train import Trainer

tf1 = tf.compat.v1


@pytest.fixture(scope="module")
def dataset(tiny_data_dir):
    return data.load_cifar10(tiny_data_dir, valid_size=20, train_examples=100, seed=0)


def _config(**kw):
    values = dict(model="original", depth=8, epochs=1, batch_size=20, valid_size=20,
                  train_examples=100, optimizer="momentum", ema_decay=0.9)
    values.update(kw)
    return TrainConfig(**values)


def _graph(trainer):
    """The trainer's training graph with the gradient-norm probe, as Trainer.build makes it."""
    g = tf.Graph()
    with g.as_default():
        t = trainer.attach_train_graph()
        attach_gradient_probe(trainer.cfg, t, t.loss_scale)
    return g


# Ops whose device says where the work of a step runs.
COMPUTE = {"Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput", "FusedBatchNormV3",
           "FusedBatchNormGradV3", "MatMul", "Relu", "ReluGrad", "SparseSoftmaxCrossEntropyWithLogits"}
UPDATE = {"ResourceApplyMomentum", "ResourceApplyKerasMomentum", "ResourceApplyAdam",
          "AssignSubVariableOp", "AssignAddVariableOp", "AssignVariableOp", "VarHandleOp"}


def _ops(g, types):
    return [op for op in g.get_operations() if op.type in types]


def _check_one_gpu_graph(g, prefix=""):
    gpu, host = prefix + "/device:GPU:0", prefix + "/device:CPU:0"
    ops = g.get_operations()
    # Every op asks for a device: the input pipeline (uint8 data) and the all-reduce
    # across processes on the host, everything else on the GPU (but the initial values
    # of variables, which TensorFlow builds without a device and runs once).
    for op in ops:
        if "/Initializer/" in op.name or op.type == "NoOp":   # NoOp: control only
            continue
        if op.type == "ReadVariableOp" and not op.device:
            # TensorFlow builds reads without a device and runs them with the variable
            op = op.inputs[0].op
        on_host = op.name.startswith(("input/", "all_reduce/", "sync/", "barrier/",
                                      "stop_request"))
        if not on_host:
            assert op.device == gpu, (op.name, op.type, op.device)
        elif op.name.startswith("input/"):
            assert op.device == host, (op.name, op.device)
    # Batch norm, the update and the loss-scaling decision are partly in tf.cond
    # branches (functions), whose nodes carry the device they were built under.
    nodes = [(op.name, op.type, op.device) for op in ops] + [
        (f.signature.name + "/" + n.name, n.op, n.device)
        for f in g.as_graph_def().library.function for n in f.node_def]
    for kind in ("Conv2D", "Conv2DBackpropFilter", "Conv2DBackpropInput", "FusedBatchNormV3",
                 "FusedBatchNormGradV3", "MatMul", "ResourceApplyMomentum", "AssignSubVariableOp",
                 "AssignVariableOp"):
        found = [(name, device) for name, t, device in nodes
                 if t == kind and not name.startswith("input/")]
        assert found, f"no {kind} op: the check would see nothing"
        assert all(device == gpu for _, device in found), (kind, found)
    assert not [node for node in nodes[len(ops):] if "CPU" in node[2]]
    names = {op.name: op.device for op in ops}
    # loss scaling, the weight average (EMA) and the batch-norm statistics' updates
    for name in ("loss_scaling/scale", "loss_scaling/skipped_steps", "global_step",
                 "model/stem/conv/kernel/ExponentialMovingAverage",
                 "model/stem/bn/moving_mean", "model/stem/conv/kernel/Momentum"):
        assert names.get(name) == gpu, (name, names.get(name))
    scale_updates = [op for op in ops if op.type == "AssignVariableOp"
                     and "loss_scaling" in op.inputs[0].op.name]
    assert scale_updates and all(op.device == gpu for op in scale_updates)
    ema_updates = [op for op in ops if "ExponentialMovingAverage" in op.name
                   and op.type == "AssignSubVariableOp"]
    assert ema_updates and all(op.device == gpu for op in ema_updates)


def test_one_process_one_gpu_puts_the_whole_step_on_the_gpu(monkeypatch, dataset, tmp_path):
    fake_gpus(monkeypatch, 1)
    trainer = Trainer(_config(), dataset, tmp_path / "r", tmp_path / "h.h5")
    assert (trainer.precision, trainer.data_format, trainer.device_type) == ("fp16", "NHWC", "GPU")
    _check_one_gpu_graph(_graph(trainer))


def test_one_task_of_a_cluster_puts_its_step_on_its_gpu(monkeypatch, dataset, tmp_path):
    fake_gpus(monkeypatch, 1)
    cluster = parse_cluster({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                             "task": {"type": "worker", "index": 1}})
    trainer = DistributedTrainer(_config(), dataset, tmp_path / "r", tmp_path / "h.h5",
                                 cluster=cluster)
    g = _graph(trainer)
    _check_one_gpu_graph(g, "/job:worker/replica:0/task:1")
    reduce = [op for op in g.get_operations() if op.type == "CollectiveReduceV2"]
    assert len(reduce) == 3 and all(op.device.endswith("task:1/device:CPU:0") for op in reduce)


def test_towers_on_their_gpus_and_the_variables_and_update_on_the_first(monkeypatch, dataset,
                                                                         tmp_path):
    fake_gpus(monkeypatch, 2)
    trainer = Trainer(_config(precision="fp32"), dataset, tmp_path / "r", tmp_path / "h.h5",
                      devices=2)
    g = _graph(trainer)
    for op in _ops(g, COMPUTE):
        tower = 1 if op.name.startswith("tower_1/") or "/tower_1/" in op.name else 0
        assert op.device == f"/device:GPU:{tower}", (op.name, op.device)
    assert any(op.device == "/device:GPU:1" for op in _ops(g, {"Conv2D"}))
    variables = _ops(g, {"VarHandleOp"})
    assert variables
    for op in variables:
        expected = "/device:CPU:0" if op.name.startswith("input/") else "/device:GPU:0"
        assert op.device == expected, (op.name, op.device)
    assert any(op.device == "/device:GPU:1" for op in _ops(g, {"Conv2DBackpropFilter"}))
    # the update, the statistics' updates and the average of the towers' gradients
    updates = _ops(g, {"ResourceApplyMomentum", "AssignSubVariableOp"}) + [
        op for op in _ops(g, {"AddN"}) if not op.name.startswith("gradients")]
    assert len(updates) > 20
    assert all(op.device == "/device:GPU:0" for op in updates), \
        [(op.name, op.device) for op in updates if op.device != "/device:GPU:0"]


def test_without_gpus_one_device_is_left_to_tensorflow_as_before(dataset, tmp_path):
    trainer = Trainer(_config(precision="fp32"), dataset, tmp_path / "r", tmp_path / "h.h5")
    assert trainer.device_type == "CPU"
    g = _graph(trainer)
    assert not [op for op in g.get_operations() if op.device]


def test_more_towers_than_gpus_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 1)
    with pytest.raises(Exception, match="only 1 GPUs are visible"):
        replicate.tower_device_type(2)


# -- launch-local: each local task gets its own GPU(s) ----------------------------------

def _fake_python(tmp_path):
    """An executable standing in for python: it prints the task's GPUs and exits."""
    script = tmp_path / "python"
    script.write_text('#!/bin/sh\necho "gpus=${CUDA_VISIBLE_DEVICES-unset}"\n')
    script.chmod(0o755)
    return str(script)


def _launch_env(tmp_path, workers, command=("train", "original"), **kw):
    import io
    out, err = io.StringIO(), io.StringIO()
    status = launch.launch_local(list(command), workers, python=_fake_python(tmp_path),
                                 stdout=out, stderr=err, grace=2, **kw)
    assert status == 0
    seen = {}
    for line in out.getvalue().splitlines():
        task, value = line.split(" gpus=")
        seen[task] = value
    return seen, err.getvalue().splitlines()[0]


def test_launch_local_gives_each_task_its_own_gpus_and_says_so_first(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    seen, first = _launch_env(tmp_path, 2)
    assert seen == {"[worker:0]": "3", "[worker:1]": "5"}
    assert "own GPU" in first and "worker:1 CUDA_VISIBLE_DEVICES=5" in first
    seen, _ = _launch_env(tmp_path, 2, ("train", "original", "--devices", "2"))
    assert seen == {"[worker:0]": "3,5", "[worker:1]": "6,7"}


def test_launch_local_counts_the_drivers_gpus_when_nothing_narrows_them(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    driver = tmp_path / "gpus"
    for address in ("0000:01:00.0", "0000:02:00.0"):
        (driver / address).mkdir(parents=True)
    monkeypatch.setattr(launch, "NVIDIA_GPUS_DIR", driver)
    seen, _ = _launch_env(tmp_path, 2, ("train", "original", "--devices=1"))
    assert seen == {"[worker:0]": "0", "[worker:1]": "1"}
    monkeypatch.setattr(launch, "NVIDIA_GPUS_DIR", tmp_path / "absent")
    seen, first = _launch_env(tmp_path, 2)
    assert seen == {"[worker:0]": "unset", "[worker:1]": "unset"} and "on the CPU" in first


def test_launch_local_refuses_too_few_gpus_unless_asked_to_share(monkeypatch, tmp_path):
    from resnet_graph.errors import UserError
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(UserError, match="2 tasks with --devices 1 need 2 GPUs, but 1 are "
                                        "visible.*--share-gpus"):
        launch.launch_local(["train", "original"], 2, python=_fake_python(tmp_path))
    seen, first = _launch_env(tmp_path, 2, share_gpus=True)
    assert seen == {"[worker:0]": "1", "[worker:1]": "1"} and "share" in first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")     # CUDA's "none"
    seen, _ = _launch_env(tmp_path, 2)
    assert seen == {"[worker:0]": "-1", "[worker:1]": "-1"}


def _steps(trainer, initial=None, steps=3):
    """Losses of ``steps`` training steps of the trainer's graph, run on this CPU (soft
    placement moves ops asked for on a GPU to it), from the weights ``initial``."""
    from resnet_graph.runtime import session_config
    g = tf.Graph()
    with g.as_default():
        t = trainer.attach_train_graph()
        model = [v for v in tf1.global_variables() if v.op.name.startswith("model/")]
        init = tf1.global_variables_initializer()
    config = session_config()
    assert config.allow_soft_placement
    ds = trainer.dataset
    with tf1.Session(graph=g, config=config) as sess:
        sess.run(init)
        if initial is None:
            initial = dict(zip([v.op.name for v in model], sess.run(model)))
        for v in model:
            v.load(initial[v.op.name], sess)
        sess.run(t.load_data, {t.data_images: ds.train.images, t.data_labels: ds.train.labels})
        losses = [sess.run([t.train_op, t.step_loss], {t.batch_index: i, t.training: True})[1]
                  for i in range(steps)]
    return losses, initial


def test_the_graph_placed_for_a_gpu_trains_like_the_cpu_graph(monkeypatch, dataset, tmp_path):
    cfg = _config(precision="fp32", ema_decay=0.0)
    plain, initial = _steps(Trainer(cfg, dataset, tmp_path / "a", tmp_path / "h.h5"))
    fake_gpus(monkeypatch, 1)
    placed = Trainer(cfg, dataset, tmp_path / "b", tmp_path / "h.h5")
    assert placed.device_type == "GPU"
    losses, _ = _steps(placed, initial)
    assert losses[0] == pytest.approx(plain[0], rel=1e-6)
    assert losses == pytest.approx(plain, rel=1e-4)
    assert plain[2] != pytest.approx(plain[0], rel=1e-3)    # the steps did train
