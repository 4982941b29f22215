"""experiments/finals_table.py: the headline-run tables, paired differences and the target report."""

import importlib.util
import json
import pathlib

import h5py
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("finals_table",
                                                  ROOT / "experiments" / "finals_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(f, root, name, valid, test=None, flip=None, seconds=100.0):
    g = f.create_group(name)
    g["epoch"] = np.arange(1, len(valid) + 1)
    g["valid_acc"] = np.asarray(valid, np.float32)
    g["seconds"] = np.full(len(valid), seconds)
    (root / name).mkdir()
    for variant, acc in (("final", test), ("final-flip", flip)):
        if acc is not None:
            (root / name / f"eval-{variant}.json").write_text(json.dumps({"accuracy": acc}))


@pytest.fixture
def finals(tmp_path):
    with h5py.File(tmp_path / "histories.h5", "w") as f:
        _write_run(f, tmp_path, "original-32-s0", [0.80, 0.875], test=0.88, flip=0.89)
        _write_run(f, tmp_path, "original-32-s1", [0.81, 0.870], test=0.90, flip=0.91)
        _write_run(f, tmp_path, "preact-32-s0", [0.79, 0.874], test=0.875, flip=0.885)
        _write_run(f, tmp_path, "preact-32-s1", [0.80])          # still training
        _write_run(f, tmp_path, "preact-20-s0", [0.70], test=0.80)  # no original-20 to pair
    return tmp_path


def test_names_split_into_model_depth_and_seed(table):
    assert table.split_name("preact-32-s1") == ("preact", "32", "1")
    assert table.split_name("zero-deadchannels") is None
    assert table.split_name("original-32-s0-fp32") is None


def test_paired_differences_use_the_original_of_the_same_depth_and_seed(table, finals):
    runs = table.read_history(finals / "histories.h5")
    for name, row in runs.items():
        table.read_evals(finals / name, row)
    diffs = table.paired_differences(runs)
    assert set(diffs) == {"preact-32-s0", "preact-32-s1"}
    assert diffs["preact-32-s0"]["test final"] == pytest.approx(-0.5)
    assert diffs["preact-32-s0"]["test final, flip"] == pytest.approx(-0.5)
    assert diffs["preact-32-s0"]["final valid"] == pytest.approx(-0.1, abs=1e-4)
    # Only columns both runs have: seed 1 of preact has no evaluation yet.
    assert "test final" not in diffs["preact-32-s1"]
    assert diffs["preact-32-s1"]["best valid"] == pytest.approx(-7.0, abs=1e-4)


def test_target_report_uses_the_mean_of_the_original_seeds(table, finals, capsys):
    table.main([str(finals), "--target-single", "89.0", "--target-flip", "90.5"])
    out = capsys.readouterr().out
    assert "| preact-32-s0 | -0.10 | -0.10 | -0.50 | -0.50 | - | - |" in out
    assert "original-32 test final: mean 89.00 over 2 seed(s), target 89.0: met" in out
    assert "original-32 test final, flip: mean 90.00 over 2 seed(s), target 90.5: missed by 0.50" \
        in out
    assert "preact-20" not in out.split("| run - original")[1].split("\n\n")[0]
