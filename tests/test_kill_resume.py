"""SIGKILL at random moments, resume, repeat: nothing is lost (tests/torture.py).

The short form (6 kills; 10 took 227 s of a 15-minute suite on the AVX2 EPYC, and under load
the run sometimes ended before the tenth kill landed) runs with the suite; the long form
(100 kills, 31 minutes measured on a busy 2-core machine) is marked ``slow`` and runs
only with ``pytest -m slow``.
"""

import importlib.util
import pathlib
import sys

import pytest

from resnet_graph import history

TORTURE = pathlib.Path(__file__).resolve().parent / "torture.py"


@pytest.fixture(scope="module")
def torture():
    spec = importlib.util.spec_from_file_location("torture", TORTURE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("torture", module)
    spec.loader.exec_module(module)
    return module


def check(summary, kills):
    assert summary["violations"] == [], summary["violations"]
    assert summary["kills"] == kills
    assert summary["final_exit_code"] == 0
    assert summary["rows"] == summary["epochs"]
    assert summary["files_lost"] == 0
    assert summary["resumes"] >= 1
    # Measured: the redone steps give the same bits as the uninterrupted run.
    for which in ("final_weights", "best_weights"):
        assert summary[which]["bitwise_equal"], summary[which]
    assert summary["history_equal"]


def test_six_sigkills_lose_nothing_and_change_no_bit(torture, tmp_path):
    summary = torture.torture(6, 0, tmp_path / "work", cli_eval=False, log=lambda line: None)
    check(summary, 6)


@pytest.mark.slow
def test_a_hundred_sigkills_lose_nothing_and_change_no_bit(torture, tmp_path):
    summary = torture.torture(100, 1, tmp_path / "work", log=lambda line: None)
    check(summary, 100)
    # The plan spreads the kills over every kind of moment.
    assert len(summary["landed"]) >= 4, summary["landed"]


def test_the_script_exits_1_on_a_violation_and_writes_the_json(torture, tmp_path,
                                                               monkeypatch):
    summary = {"kills_requested": 1, "kills": 1, "seed": 0, "epochs": 2, "steps_per_epoch": 9,
               "landed": {"history write": 1}, "kills_with_history_row_ahead": 0,
               "resumes": 1, "new_starts": 1, "leftover_files": {}, "leftover_bytes": 0,
               "seconds": 0, "reference_seconds": 0, "violations": ["planted"]}
    monkeypatch.setattr(torture, "torture", lambda *a, **k: summary)
    out = tmp_path / "s.json"
    assert torture.main(["--kills", "1", "--work", str(tmp_path / "w"),
                         "--json-out", str(out)]) == 1
    assert '"planted"' in out.read_text()


@pytest.mark.parametrize("leftover", [[".lock"], [".lock", ".config.json.tmp-12345"]])
def test_a_start_killed_before_its_config_can_be_started_again(tiny_data_dir, tmp_path,
                                                                leftover):
    # What SIGKILL leaves when it lands between taking the run lock and writing
    # config.json (seen in the torture): `--resume` has nothing to resume, so a plain
    # start must work and not call the folder an existing run.
    from resnet_graph.config import TrainConfig
    from resnet_graph.errors import UserError
    from resnet_graph.runs import train_run
    folder = tmp_path / "original-8"
    folder.mkdir()
    for name in leftover:
        (folder / name).write_text("")
    cfg = TrainConfig(model="original", depth=8, epochs=1, batch_size=50, valid_size=50)
    with pytest.raises(UserError, match="drop --resume"):
        train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, resume=True, quiet=True)
    train_run(cfg, data_dir=tiny_data_dir, out=tmp_path, quiet=True)
    assert history.read_run(tmp_path / "histories.h5", "original-8").epochs == 1
    # A folder with anything else in it is still somebody's run.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        train_run(cfg.replace(name="other"), data_dir=tiny_data_dir, out=tmp_path, quiet=True)
