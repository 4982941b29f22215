"""A resumed run is the run that was started: --resume (and every cluster task) uses
the precision and layout config.json recorded as resolved, not what ``auto`` would
pick on the machine that resumes it."""

import hashlib
import json
import shutil

import h5py
import pytest
import tensorflow as tf
from click.testing import CliRunner
from fake_gpus import fake_gpus

from resnet_graph import checkpoint, data, history, precision
from resnet_graph.cli import cli
from resnet_graph.config import TrainConfig
from resnet_graph.distributed import config_fingerprint
from resnet_graph.runs import resumed_config, train_run
from resnet_graph.train import Trainer

tf1 = tf.compat.v1


def _config(**kw):
    values = dict(model="original", depth=8, epochs=1, batch_size=50, valid_size=50,
                  train_examples=100, lr=0.01, name="r")
    values.update(kw)
    return TrainConfig(**values)


def _made_run(tmp_path_factory, tiny_data_dir, precision, **recorded):
    """A 1-epoch run trained here in ``precision``, whose config.json is then made to say
    what another machine would have written: ``precision: auto`` and ``recorded``."""
    out = tmp_path_factory.mktemp(precision)
    train_run(_config(precision=precision), data_dir=tiny_data_dir, out=out, quiet=True)
    saved = checkpoint.read_config(out / "r")
    saved.update(precision="auto", **recorded)
    (out / "r" / "config.json").write_text(json.dumps(saved, indent=2))
    return out


@pytest.fixture(scope="module")
def gpu_made(tmp_path_factory, tiny_data_dir):
    """As a GPU machine makes it: auto resolved to fp16 (NHWC); a loss scale that
    overflows makes loss scaling skip the first step of its epoch, and the scale it then
    falls to (2^40 / 2^30) applies the second (an epoch of skips only would fail the run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "INITIAL_LOSS_SCALE", 2.0 ** 40)
        mp.setattr(precision, "LOSS_SCALE_BACKOFF", 2.0 ** 30)
        out = _made_run(tmp_path_factory, tiny_data_dir, "fp16", resolved_precision="fp16",
                        resolved_data_format="NHWC")
    prefix = checkpoint.latest(out / "r")
    assert tf.train.load_variable(prefix, "loss_scaling/skipped_steps") == 1
    assert tf.train.load_variable(prefix, "global_step") == 1
    return out


@pytest.fixture(scope="module")
def cpu_made(tmp_path_factory, tiny_data_dir):
    """As this CPU makes it: auto resolved to fp32 NHWC."""
    return _made_run(tmp_path_factory, tiny_data_dir, "fp32", resolved_precision="fp32",
                     resolved_data_format="NHWC")


def _copy(out, tmp_path):
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out"


def _checkpoint_names(prefix):
    return {name for name, _ in tf.train.list_variables(prefix)}


def test_a_gpu_fp16_run_resumed_on_the_cpu_goes_on_in_fp16(gpu_made, tiny_data_dir, tmp_path):
    out = _copy(gpu_made, tmp_path)
    train_run(_config(), data_dir=tiny_data_dir, out=out, resume=True, epochs_override=2,
              quiet=True)
    prefix = checkpoint.latest(out / "r")
    assert prefix.endswith("-4")
    names = _checkpoint_names(prefix)
    assert {"loss_scaling/scale", "loss_scaling/skipped_steps"} <= names
    steps = (tf.train.load_variable(prefix, "global_step")
             + tf.train.load_variable(prefix, "loss_scaling/skipped_steps"))
    assert steps == 4
    saved = checkpoint.read_config(out / "r")
    assert (saved["precision"], saved["resolved_precision"], saved["epochs"]) == ("auto", "fp16", 2)


def _tree(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_run_this_machine_cannot_continue_is_one_error_line_and_nothing_changes(
        gpu_made, tiny_data_dir, tmp_path):
    out = _copy(gpu_made, tmp_path)
    saved = checkpoint.read_config(out / "r")
    saved["resolved_data_format"] = "NCHW"      # fp16 NCHW: this CPU has no kernel
    (out / "r" / "config.json").write_text(json.dumps(saved, indent=2))
    before = _tree(out)
    result = CliRunner().invoke(cli, ["train", "original", "--name", "r", "--out", str(out),
                                      "--resume", "--epochs", "2", "--data-dir",
                                      str(tiny_data_dir)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: run 'r' trains in fp16 NCHW"), lines
    assert "cannot run" in lines[0] and "only supports NHWC" in lines[0]
    assert "Traceback" not in result.output
    assert _tree(out) == before
    # Its advice: go on here in this machine's choice (fp32 or bf16, NHWC), on purpose.
    here = precision.resolve_precision("auto")
    layout = precision.resolve_data_format("auto", precision=here)
    assert "--resume --precision auto --data-format auto" in lines[0]
    result = CliRunner().invoke(cli, ["train", "original", "--name", "r", "--out", str(out),
                                      "--resume", "--epochs", "2", "--data-dir",
                                      str(tiny_data_dir), "--precision", "auto",
                                      "--data-format", "auto"])
    assert result.exit_code == 0, result.output
    assert f"goes on in {here} {layout} (it trained in fp16 NCHW until now)" in result.output
    prefix = checkpoint.latest(out / "r")
    # The skipped fp16 step stays counted: 2 epochs of 2 steps were taken.
    assert prefix.endswith("-4") and tf.train.load_variable(prefix, "global_step") == 4
    assert not [n for n in _checkpoint_names(prefix) if n.startswith("loss_scaling")]
    saved = checkpoint.read_config(out / "r")
    assert (saved["resolved_precision"], saved["resolved_data_format"]) == (here, layout)
    run = history.read_run(out / "histories.h5", "r", guard=False)
    assert run.attrs["precision"] == here and list(run.columns["epoch"]) == [1, 2]


def test_a_cpu_run_goes_on_in_fp16_when_asked(cpu_made, tiny_data_dir, tmp_path):
    out = _copy(cpu_made, tmp_path)
    train_run(_config(), data_dir=tiny_data_dir, out=out, resume=True, epochs_override=2,
              quiet=True, switch={"precision": "fp16"})
    prefix = checkpoint.latest(out / "r")
    assert prefix.endswith("-4")
    assert tf.train.load_variable(prefix, "loss_scaling/skipped_steps") \
        + tf.train.load_variable(prefix, "global_step") == 4
    assert checkpoint.read_config(out / "r")["resolved_precision"] == "fp16"


def test_a_cpu_run_resumed_on_a_gpu_keeps_fp32_nhwc_and_fits_its_checkpoint(
        monkeypatch, cpu_made, tiny_data_dir, tmp_path):
    fake_gpus(monkeypatch, 1)     # auto would now say fp16 (and NCHW for fp32)
    cfg = resumed_config(checkpoint.read_config(cpu_made / "r"))
    ds = data.load_cifar10(tiny_data_dir, valid_size=50, train_examples=100, seed=0)
    trainer = Trainer(cfg, ds, tmp_path / "r", tmp_path / "h.h5", resume=True)
    assert (trainer.precision, trainer.data_format) == ("fp32", "NHWC")
    g = tf.Graph()
    with g.as_default():
        trainer.attach_train_graph()
        graph_names = {v.op.name for v in tf1.global_variables()}
    # The Saver restores every global variable: each must be in the checkpoint.
    assert graph_names == _checkpoint_names(checkpoint.latest(cpu_made / "r"))


def test_cluster_tasks_compare_what_they_resolved():
    auto = _config()
    assert config_fingerprint(auto, "fp16", "NHWC") == \
        config_fingerprint(auto.replace(precision="fp16"), "fp16", "NHWC")
    assert config_fingerprint(auto, "fp16", "NHWC") != config_fingerprint(auto, "fp32", "NHWC")
    assert config_fingerprint(auto, "fp32", "NHWC") != config_fingerprint(auto, "fp32", "NCHW")


def _drop_from_checkpoint(prefix, name):
    """Rewrite checkpoint ``prefix`` without variable ``name``, as a version before it wrote."""
    reader = tf.train.load_checkpoint(prefix)
    values = {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix) if n != name}
    assert len(values) == len(tf.train.list_variables(prefix)) - 1
    g = tf.Graph()
    with g.as_default():
        variables = {n: tf1.Variable(v, name=f"v{i}") for i, (n, v) in enumerate(values.items())}
        saver = tf1.train.Saver(variables)
        with tf1.Session(graph=g) as sess:
            sess.run(tf1.global_variables_initializer())
            saver.save(sess, prefix, write_meta_graph=False, write_state=False)
    assert name not in _checkpoint_names(prefix)


def test_an_fp16_checkpoint_older_than_the_epoch_skip_count_resumes(gpu_made, tiny_data_dir,
                                                                     tmp_path):
    """Checkpoints written before loss_scaling/epoch_skipped existed (commit cce73e7) go on
    from their weights, position and run-wide skip count, with one line saying so."""
    out = _copy(gpu_made, tmp_path)
    old = checkpoint.latest(out / "r")
    weights = tf.train.load_variable(old, "model/stem/conv/kernel")
    _drop_from_checkpoint(old, "loss_scaling/epoch_skipped")
    # Its best checkpoint too, and epoch 1 stays the best, so that the end of the run
    # evaluates that old best checkpoint.
    _drop_from_checkpoint(checkpoint.latest(out / "r" / "best"), "loss_scaling/epoch_skipped")
    with h5py.File(out / "histories.h5", "r+") as f:
        f["r/valid_acc"][0] = 1.0
    trainer_lines = []
    train_run(_config(), data_dir=tiny_data_dir, out=out, resume=True, epochs_override=2,
              log=trainer_lines.append)
    assert any("predates loss_scaling/epoch_skipped" in line for line in trainer_lines), \
        trainer_lines
    assert not any("goes on in" in line for line in trainer_lines)    # not a switch
    prefix = checkpoint.latest(out / "r")
    assert prefix.endswith("-4")
    assert tf.train.load_variable(prefix, "loss_scaling/skipped_steps") \
        + tf.train.load_variable(prefix, "global_step") == 4
    assert tf.train.load_variable(prefix, "loss_scaling/skipped_steps") >= 1   # epoch 1's skip
    assert not (tf.train.load_variable(prefix, "model/stem/conv/kernel") == weights).all()
    saved = checkpoint.read_config(out / "r")
    assert saved["resolved_precision"] == "fp16" and saved["epochs"] == 2
    run = history.read_run(out / "histories.h5", "r", guard=False)
    assert list(run.columns["epoch"]) == [1, 2]
    assert run.attrs["best_epoch"] == 1 and "best_test_acc" in run.attrs


def test_a_checkpoint_missing_a_model_variable_is_still_refused(gpu_made, tiny_data_dir,
                                                                 tmp_path):
    out = _copy(gpu_made, tmp_path)
    _drop_from_checkpoint(checkpoint.latest(out / "r"), "model/stem/conv/kernel")
    result = CliRunner().invoke(cli, ["train", "original", "--name", "r", "--out", str(out),
                                      "--resume", "--epochs", "2", "--data-dir",
                                      str(tiny_data_dir)])
    assert result.exit_code == 1, result.output
    assert "does not fit this model" in result.output and "Traceback" not in result.output
