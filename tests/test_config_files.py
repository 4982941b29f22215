"""--config files (YAML/JSON, a run's config.json) and --deterministic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from resnet_graph import history
from resnet_graph.cli import cli
from resnet_graph.config import make_config, read_config_file

TINY = ["--depth", "8", "--epochs", "1", "--batch-size", "50", "--valid-size", "50", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def saved_config(out, name):
    return json.loads((out / name / "config.json").read_text())


def test_yaml_file_sets_options_and_flags_win(tiny_data_dir, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("recipe: fast\nlr: 0.02\nlabel-smoothing: 0.05\nepochs: 3\nbatch_size: 25\n")
    result = invoke("train", "plain", "--config", path, *TINY, "--data-dir", tiny_data_dir,
                    "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    cfg = saved_config(tmp_path / "out", "plain-8")
    assert cfg["recipe"] == "fast" and cfg["nesterov"] is True        # the file named the recipe
    assert cfg["lr"] == 0.02 and cfg["label_smoothing"] == 0.05       # the file beat the recipe
    assert cfg["epochs"] == 1 and cfg["batch_size"] == 50             # typed flags beat the file


def test_a_runs_config_json_reruns_the_same_setup(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    first = invoke("train", "original", "--recipe", "fast", "--lr", "0.03", "--seed", "4",
                   *TINY, "--data-dir", tiny_data_dir, "--out", out)
    assert first.exit_code == 0, first.output
    again = invoke("train", "original", "--config", out / "original-8" / "config.json",
                   "--name", "again", "--data-dir", tiny_data_dir, "--out", out, "--quiet")
    assert again.exit_code == 0, again.output
    a, b = saved_config(out, "original-8"), saved_config(out, "again")
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    runs = [history.read_run(out / "histories.h5", n) for n in ("original-8", "again")]
    np.testing.assert_allclose(runs[0].columns["train_loss"], runs[1].columns["train_loss"],
                               rtol=1e-6)


@pytest.mark.parametrize("text, suffix, fragment", [
    ("lr: 0.1\nlearning_rate: 3\n", ".yaml", "unknown option 'learning_rate'"),
    ("lr: [1, 2\n", ".yaml", "is not valid YAML"),
    ('{"lr": 0.1,}', ".json", "is not valid JSON"),
    ("- 1\n- 2\n", ".yml", "must hold a mapping"),
])
def test_bad_config_files_are_one_line_errors(tiny_data_dir, tmp_path, text, suffix, fragment):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    result = invoke("train", "original", "--config", path, *TINY, "--data-dir", tiny_data_dir,
                    "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_config_file_values_are_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr_boundaries: [100, 200]\nlr_schedule: step\n")
    values = read_config_file(path)
    assert make_config("original", "he2016", **values).lr_boundaries == (100, 200)
    path.write_text("label_smoothing: 1.5\n")
    with pytest.raises(ValueError, match="label-smoothing"):
        make_config("original", "seed", **read_config_file(path))


def test_a_lengthened_runs_schedule_state_is_not_taken_by_a_new_run(tmp_path):
    # The config.json of a run lengthened by --resume --epochs records where its cosine
    # decay restarted; a new run from that file starts its own schedule.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"recipe": "fast", "lr": 0.2, "decay_from_step": 3,
                                "decay_from_lr": 0.5, "normalization": {}}))
    values = read_config_file(path)
    assert values == {"recipe": "fast", "lr": 0.2}
    cfg = make_config("original", "fast", **{k: v for k, v in values.items() if k != "recipe"})
    assert (cfg.decay_from_step, cfg.decay_from_lr) == (0, 0.0)
    table = json.loads(invoke("recipes", "--json").stdout)
    assert not {"decay_from_step", "decay_from_lr"} & set(table["fast"])


def test_deterministic_runs_give_identical_histories(tiny_data_dir, tmp_path):
    # Op determinism is process-wide, so each run gets its own process.
    exe = os.path.join(os.path.dirname(sys.executable), "resnet-graph")
    for name in ("a", "b"):
        subprocess.run([exe, "train", "preact", "--depth", "8", "--epochs", "2", "--batch-size",
                        "50", "--valid-size", "50", "--augment", "--deterministic", "--quiet",
                        "--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--name", name],
                       check=True, capture_output=True, timeout=600)
    a, b = (history.read_run(tmp_path / "histories.h5", n) for n in ("a", "b"))
    for field in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert a.columns[field].tolist() == b.columns[field].tolist()   # bit for bit
    assert a.attrs["test_loss"] == b.attrs["test_loss"]
    assert a.attrs["config"]["deterministic"] is True


def test_the_new_block_options_through_the_cli_and_a_config_file(tiny_data_dir, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "blocks.yaml"
    path.write_text("init: he\nstride-padding: symmetric\nema_decay: 0.5\n")
    result = invoke("train", "preact", "--config", path, "--zero-init-residual", "--ema-decay",
                    "0.9", *TINY, "--data-dir", tiny_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    cfg = saved_config(out, "preact-8")
    assert (cfg["init"], cfg["stride_padding"], cfg["zero_init_residual"], cfg["ema_decay"]) == (
        "he", "symmetric", True, 0.9)                     # the typed --ema-decay wins
    # he2016 brings he + symmetric; the flags override it.
    result = invoke("train", "original", "--recipe", "he2016", "--stride-padding", "same",
                    *TINY, "--data-dir", tiny_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    cfg = saved_config(out, "original-8")
    assert (cfg["init"], cfg["stride_padding"], cfg["zero_init_residual"], cfg["ema_decay"]) == (
        "he", "same", False, 0.0)


@pytest.mark.parametrize("command", ["train", "experiment"])
def test_zero_init_residual_is_refused_for_plain(tiny_data_dir, tmp_path, command):
    args = ["train", "plain"] if command == "train" else ["experiment", "--models",
                                                          "original,plain"]
    result = CliRunner().invoke(cli, [*args, "--zero-init-residual", *TINY, "--data-dir",
                                      str(tiny_data_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2      # a usage mistake, whichever model comes first
    assert "plain has no shortcut" in result.output
    assert not (tmp_path / "out" / "original-8-s0").exists()


def test_experiment_names_its_default_folder_from_the_config_file(tiny_data_dir, tmp_path,
                                                                  monkeypatch):
    path = tmp_path / "setup.yaml"
    path.write_text("recipe: fast\ndepth: 8\nepochs: 1\nbatch_size: 50\nvalid_size: 50\n")
    monkeypatch.chdir(tmp_path)
    result = invoke("experiment", "--models", "plain", "--config", path, "--quiet",
                    "--data-dir", tiny_data_dir)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "checkpoints" / "experiment-fast-8" / "plain-8-s0" / "config.json").is_file()
