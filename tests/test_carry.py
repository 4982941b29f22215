"""experiments/carry.py: the snapshot of an experiment folder that long runs carry across machines."""

import importlib.util
import json
import pathlib

import h5py
import numpy as np
import pytest
import tensorflow as tf

tf1 = tf.compat.v1
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def carry():
    spec = importlib.util.spec_from_file_location("carry", ROOT / "experiments" / "carry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_checkpoints(folder: pathlib.Path, steps, value=0.0):
    """Real Saver checkpoints of one variable (value + step) at ``steps``; keeps the last 3."""
    graph = tf.Graph()
    with graph.as_default():
        var = tf1.get_variable("w", initializer=np.float32(0.0))
        step = tf1.placeholder(tf.float32, [])
        assign = var.assign(step + value)
        saver = tf1.train.Saver(max_to_keep=3, save_relative_paths=True)
        with tf1.Session(graph=graph) as sess:
            for s in steps:
                sess.run(assign, {step: s})
                saver.save(sess, str(folder / "model.ckpt"), global_step=s, write_meta_graph=False)


def _restored_value(folder: pathlib.Path) -> float:
    prefix = tf1.train.latest_checkpoint(str(folder))
    assert prefix is not None, f"no checkpoint found in {folder}"
    return float(tf.train.load_checkpoint(prefix).get_tensor("w"))


def _experiment(tmp_path: pathlib.Path) -> pathlib.Path:
    exp = tmp_path / "exp"
    run = exp / "original-32-s0"
    (run / "best").mkdir(parents=True)
    with h5py.File(exp / "histories.h5", "w") as f:
        f.create_group("original-32-s0").create_dataset("epoch", data=np.arange(1, 5))
    (run / "config.json").write_text(json.dumps({"model": "original"}))
    (run / "eval-final.json").write_text(json.dumps({"accuracy": 0.5}))
    (run / "events.out.tfevents.1.vm").write_bytes(b"x" * 100)
    (run / ".lock").write_text("")
    _save_checkpoints(run, [10, 20, 30, 40])
    _save_checkpoints(run / "best", [20], value=0.5)
    (run / "best" / "best.json").write_text(json.dumps({"epoch": 2}))
    (exp / "report.md").write_text("Figures: [loss.png](loss.png)")
    (exp / "loss.png").write_bytes(b"\x89PNG")
    (exp / "run.log").write_text("a log, not carried")
    return exp


def test_save_keeps_the_latest_checkpoint_only_and_restores_elsewhere(carry, tmp_path):
    exp = _experiment(tmp_path)
    snap = tmp_path / "snap"
    assert carry.main(["save", str(exp), str(snap)]) == 0

    run = snap / "original-32-s0"
    names = sorted(p.name for p in run.iterdir() if p.is_file())
    assert names == ["checkpoint", "config.json", "eval-final.json", "model.ckpt-40.data-00000-of-00001",
                     "model.ckpt-40.index"]
    assert sorted(p.name for p in (run / "best").iterdir()) == [
        "best.json", "checkpoint", "model.ckpt-20.data-00000-of-00001", "model.ckpt-20.index"]
    assert _restored_value(run) == 40.0
    assert _restored_value(run / "best") == 20.5
    with h5py.File(snap / "histories.h5", "r") as f:
        assert list(f["original-32-s0/epoch"][()]) == [1, 2, 3, 4]
    # The report and the figures it links to travel together; logs stay behind.
    assert sorted(p.name for p in snap.iterdir() if p.is_file()) == ["histories.h5", "loss.png", "report.md"]

    # The machine is gone: restore into a new folder; the checkpoint resolves there.
    fresh = tmp_path / "elsewhere" / "exp"
    assert carry.main(["restore", str(snap), str(fresh)]) == 0
    assert _restored_value(fresh / "original-32-s0") == 40.0
    assert _restored_value(fresh / "original-32-s0" / "best") == 20.5
    assert (fresh / "histories.h5").is_file()
    assert not list(fresh.glob(".*carry-tmp"))


def test_a_second_save_replaces_the_older_snapshot(carry, tmp_path):
    exp = _experiment(tmp_path)
    snap = tmp_path / "snap"
    carry.main(["save", str(exp), str(snap)])
    _save_checkpoints(exp / "original-32-s0", [50])          # the run went on
    (snap / "stale.txt").write_text("left from before")
    carry.main(["save", str(exp), str(snap)])
    run = snap / "original-32-s0"
    assert not list(run.glob("model.ckpt-40.*"))
    assert _restored_value(run) == 50.0
    assert not (snap / "stale.txt").exists()


def test_restore_never_overwrites_a_run_that_exists(carry, tmp_path):
    exp = _experiment(tmp_path)
    snap = tmp_path / "snap"
    carry.main(["save", str(exp), str(snap)])
    _save_checkpoints(exp / "original-32-s0", [50])
    carry.main(["restore", str(snap), str(exp)])
    assert _restored_value(exp / "original-32-s0") == 50.0     # the newer local state stays


def test_refuses_a_folder_without_history(carry, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no histories.h5"):
        carry.main(["save", str(tmp_path / "empty"), str(tmp_path / "snap")])
    with pytest.raises(SystemExit, match="no histories.h5"):
        carry.main(["restore", str(tmp_path / "empty"), str(tmp_path / "exp")])


def test_save_refuses_to_write_into_a_live_experiment_folder(carry, tmp_path):
    exp = _experiment(tmp_path)
    snap = tmp_path / "snap"
    carry.main(["save", str(exp), str(snap)])
    before = sorted(p.name for p in (exp / "original-32-s0").iterdir())
    with pytest.raises(SystemExit, match="not a snapshot"):
        carry.main(["save", str(snap), str(exp)])               # the arguments swapped
    assert sorted(p.name for p in (exp / "original-32-s0").iterdir()) == before


def test_a_snapshot_without_checkpoints_restores_the_history_only(carry, tmp_path):
    # What a fresh clone holds: checkpoints are not committed (.gitignore).
    exp = _experiment(tmp_path)
    snap = tmp_path / "snap"
    carry.main(["save", str(exp), str(snap)])
    for path in snap.rglob("*"):
        if path.is_file() and (path.name == "checkpoint" or path.name.startswith("model.ckpt-")):
            path.unlink()
    fresh = tmp_path / "fresh"
    carry.main(["restore", str(snap), str(fresh)])
    assert (fresh / "histories.h5").is_file()
    assert not (fresh / "original-32-s0").exists()     # `experiment` trains it again


def test_a_finished_run_without_checkpoints_restores_its_config_and_evaluations(carry, tmp_path):
    # A fresh clone's snapshot of finished runs: `experiment` keeps them by the history, and
    # experiments/finals.sh skips an evaluation whose JSON is there, so these files must come back.
    from resnet_graph import history

    snap = tmp_path / "snap"
    path = snap / "histories.h5"
    for name in ("original-32-s0", "preact-32-s1"):
        history.create_run(path, name, config={"model": name.split("-")[0]})
        history.append_epoch(path, name, {"epoch": 1, "train_loss": 1.0, "train_acc": 0.5,
                                          "valid_loss": 1.1, "valid_acc": 0.4, "lr": 0.1,
                                          "seconds": 2.0})
        (snap / name).mkdir()
        (snap / name / "config.json").write_text(json.dumps({"model": name}))
    history.set_attrs(path, "original-32-s0", test_loss=0.4, test_acc=0.88)
    (snap / "original-32-s0" / "eval-final.json").write_text(json.dumps({"accuracy": 0.88}))
    (snap / "original-32-s0" / "best").mkdir()
    (snap / "original-32-s0" / "best" / "best.json").write_text(json.dumps({"epoch": 1}))

    fresh = tmp_path / "fresh"
    assert carry.main(["restore", str(snap), str(fresh)]) == 0
    done = fresh / "original-32-s0"
    assert json.loads((done / "eval-final.json").read_text()) == {"accuracy": 0.88}
    assert (done / "config.json").is_file() and (done / "best" / "best.json").is_file()
    assert not (fresh / "preact-32-s1").exists()      # unfinished: trains again from its start


def test_lean_save_keeps_checkpoints_of_unfinished_runs_only(carry, tmp_path):
    from resnet_graph import history
    exp = tmp_path / "exp"
    row = dict(epoch=1, train_loss=1.0, train_acc=0.5, valid_loss=1.0, valid_acc=0.5, lr=0.1,
               seconds=1.0)
    for name, done in (("plain-20-s0", True), ("plain-32-s0", False)):
        run = exp / name
        (run / "best").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"model": "plain"}))
        _save_checkpoints(run, [10])
        _save_checkpoints(run / "best", [10])
        (run / "best" / "best.json").write_text(json.dumps({"epoch": 1}))
        history.create_run(exp / "histories.h5", name, config={"model": "plain"})
        history.append_epoch(exp / "histories.h5", name, row)
        if done:
            history.set_attrs(exp / "histories.h5", name, test_acc=0.8)
            (run / "responses.json").write_text(json.dumps({"layers": [{"std": 1.0}]}))
    snap = tmp_path / "snap"
    assert carry.main(["save", "--lean", str(exp), str(snap)]) == 0
    done = snap / "plain-20-s0"
    assert sorted(p.name for p in done.iterdir() if p.is_file()) == ["config.json",
                                                                    "responses.json"]
    assert sorted(p.name for p in (done / "best").iterdir()) == ["best.json"]
    assert _restored_value(snap / "plain-32-s0") == 10.0
    assert _restored_value(snap / "plain-32-s0" / "best") == 10.0
    # Without --lean the finished run keeps its checkpoint too.
    full = tmp_path / "full"
    carry.main(["save", str(exp), str(full)])
    assert _restored_value(full / "plain-20-s0") == 10.0
