"""The forked read probe guards files from outside, not the file a run writes.

A fork of a multi-threaded TensorFlow process can leave the child blocked on a
lock another thread held, and the probe would then refuse a good history; so a
training run reads and rewrites its own history without a fork, while
``plot`` and ``experiment`` (on a folder that already holds a history) still
read a file from outside in a child with a time limit first.
"""

from pathlib import Path

import pytest
from click.testing import CliRunner

from resnet_graph import history
from resnet_graph.cli import cli
from resnet_graph.config import TrainConfig
from resnet_graph.errors import HistoryError
from resnet_graph.runs import train_run


@pytest.fixture
def probes(monkeypatch):
    """The paths history._probe was asked to vet (it still vets them)."""
    seen = []
    real = history._probe

    def record(path):
        seen.append(Path(path))
        real(path)
    monkeypatch.setattr(history, "_probe", record)
    return seen


def test_a_run_reads_and_writes_its_own_history_without_a_fork(tiny_data_dir, tmp_path, probes):
    cfg = TrainConfig(depth=8, epochs=2, batch_size=50, valid_size=50, seed=0, name="own")
    train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    train_run(cfg.replace(name="again"), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    train_run(cfg.replace(epochs=3), data_dir=tiny_data_dir, out=tmp_path, quiet=True,
              resume=True, epochs_override=3)
    assert probes == []
    assert history.read_run(tmp_path / "histories.h5", "own").epochs == 3


def test_plot_vets_a_history_from_outside(tmp_path, probes):
    path = tmp_path / "outside.h5"
    history.create_run(path, "r", config={})
    history.append_epoch(path, "r", dict(epoch=1, train_loss=2.0, train_acc=0.2, valid_loss=2.1,
                                         valid_acc=0.2, lr=0.1, seconds=1.0))
    result = CliRunner().invoke(cli, ["plot", str(path), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert probes == [path]


def test_a_history_that_hangs_the_reader_is_refused_in_bounded_time(tmp_path, monkeypatch):
    """What the probe does with a file whose read never ends: the child is killed
    after the limit and the file is reported as damaged (simulated by a read
    that sleeps in the child only)."""
    import os
    import time
    path = tmp_path / "hangs.h5"
    history.create_run(path, "r", config={})
    parent = os.getpid()
    real = history._load_group

    def slow(group, name, where):
        if os.getpid() != parent:
            time.sleep(60)
        return real(group, name, where)
    monkeypatch.setattr(history, "_load_group", slow)
    monkeypatch.setattr(history, "PROBE_SECONDS", 1.0)
    start = time.monotonic()
    with pytest.raises(HistoryError, match="did not finish"):
        history.read_history(path)
    assert time.monotonic() - start < 30
    assert [r.name for r in history.read_history(path, guard=False)] == ["r"]
