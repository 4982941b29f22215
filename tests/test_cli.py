"""Every command of the CLI contract through click's CliRunner, errors included."""

import json
import pathlib
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import write_synthetic_cifar

from resnet_graph import checkpoint, history
from resnet_graph.cli import cli
from resnet_graph.config import RECIPES, make_config

TINY = ["--depth", "8", "--epochs", "1", "--batch-size", "50", "--valid-size", "50"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run trained through the CLI, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_synthetic_cifar(root / "data", n_train_per_batch=60, n_test=100)
    result = invoke("train", "proposed", *TINY, "--data-dir", folder, "--out", root / "out",
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""   # --quiet: not even the start lines (docs/cli.md)
    return root, folder


def test_train_writes_the_contracted_files(trained):
    root, _ = trained
    run_dir = root / "out" / "preact-8"
    assert (run_dir / "config.json").is_file() and (run_dir / "checkpoint").is_file()
    run = history.read_run(root / "out" / "histories.h5", "preact-8")
    assert run.epochs == 1 and "test_acc" in run.attrs and "test_loss" in run.attrs


def test_eval_json_has_the_contracted_fields(trained):
    root, folder = trained
    result = invoke("eval", "--ckpt", root / "out" / "preact-8", "--json", "--data-dir", folder)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["split"] == "test" and out["examples"] == 100
    assert 0 <= out["accuracy"] <= 1 and out["loss"] > 0
    assert len(out["per_class_accuracy"]) == 10
    assert len(out["confusion"]) == 10 and all(len(r) == 10 for r in out["confusion"])
    assert sum(map(sum, out["confusion"])) == 100
    valid = json.loads(invoke("eval", "--ckpt", root / "out" / "preact-8", "--json",
                              "--split", "valid", "--batch-size", "7").stdout)
    run = history.read_run(root / "out" / "histories.h5", "preact-8")
    assert valid["examples"] == 50
    assert valid["accuracy"] == pytest.approx(float(run.columns["valid_acc"][-1]))


def test_plot_writes_loss_and_accuracy(trained, tmp_path):
    root, _ = trained
    result = invoke("plot", root / "out" / "histories.h5", "--out", tmp_path / "fig")
    assert result.exit_code == 0, result.output
    for name in ("loss.png", "accuracy.png"):
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = invoke("plot", root / "out" / "histories.h5", "--out", tmp_path / "f2",
                    "--runs", "nope")
    assert_one_line_error(result, "nope")


def test_summary_json(tmp_path):
    result = invoke("summary", "original", "--depth", "20", "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["model"] == "original" and out["depth"] == 20
    assert out["params"] == 269722 and out["conv_layers"] == 19 and out["dense_layers"] == 1
    text = invoke("summary", "cnn").stdout
    assert "stage3" in text and "464,154" in text


@pytest.mark.parametrize("input_mode,precision", [("graph", "fp32"), ("feed", "bf16")])
def test_bench_json(input_mode, precision):
    result = invoke("bench", "plain", "--depth", "8", "--batch-size", "10", "--steps", "2",
                    "--warmup", "1", "--json", "--input", input_mode, "--precision", precision)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for key in ("model", "depth", "batch_size", "precision", "device", "images_per_sec"):
        assert key in out
    assert out["model"] == "plain" and out["batch_size"] == 10 and out["images_per_sec"] > 0
    assert out["precision"] == precision
    assert out["input"] == ("feed_dict" if input_mode == "feed" else "in-graph")


@pytest.mark.parametrize("args", [
    ["train", "resnet"], ["summary", "vgg"], ["train", "original", "--depth", "33"],
    ["summary", "original", "--depth", "30"], ["train", "original", "--epochs", "0"],
    ["train", "original", "--batch-size", "-1"], ["train", "original", "--lr", "-0.1"],
    ["eval"], ["train", "original", "--precision", "fp8"],
    ["train", "original", "--lr-boundaries", "5,2"], ["train", "original", "--lr-boundaries", "x"],
])
def test_usage_mistakes_exit_2(args):
    assert invoke(*args).exit_code == 2


def test_missing_data_file(tiny_data_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_data_dir, folder)
    (folder / "data_batch_3.bin").unlink()
    result = invoke("train", "original", *TINY, "--data-dir", folder, "--out", tmp_path / "o")
    assert_one_line_error(result, "data_batch_3.bin", "--data-dir")
    assert not (tmp_path / "o").exists()


def test_truncated_data_file(tiny_data_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_data_dir, folder)
    raw = (folder / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(raw[:-100])
    result = invoke("train", "original", *TINY, "--data-dir", folder, "--out", tmp_path / "o")
    assert_one_line_error(result, "test_batch.bin")


def test_bad_label_byte(tiny_data_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_data_dir, folder)
    raw = bytearray((folder / "data_batch_1.bin").read_bytes())
    raw[3073 * 5] = 12
    (folder / "data_batch_1.bin").write_bytes(bytes(raw))
    result = invoke("train", "original", *TINY, "--data-dir", folder, "--out", tmp_path / "o")
    assert_one_line_error(result, "data_batch_1.bin")


def test_a_run_folder_that_does_not_exist(tmp_path):
    assert_one_line_error(invoke("eval", "--ckpt", tmp_path / "nowhere"),
                          f"run folder {tmp_path / 'nowhere'} does not exist")


def test_folder_without_checkpoint(tmp_path):
    assert_one_line_error(invoke("eval", "--ckpt", tmp_path), str(tmp_path))


def test_file_that_is_not_a_history(tmp_path):
    bogus = tmp_path / "notes.h5"
    bogus.write_text("hello")
    assert_one_line_error(invoke("plot", bogus, "--out", tmp_path / "fig"), "notes.h5")
    assert bogus.read_text() == "hello"
    assert not (tmp_path / "fig" / "loss.png").exists()


def test_plot_names_another_programs_hdf5_file_and_tells_same_named_runs_apart(
        trained, tmp_path, monkeypatch):
    foreign = tmp_path / "weights.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    assert_one_line_error(invoke("plot", foreign, "--out", tmp_path / "fig"),
                          "is an HDF5 file but not a resnet-graph history")
    root, _ = trained
    hist = root / "out" / "histories.h5"
    copy = tmp_path / "other" / "histories.h5"
    copy.parent.mkdir()
    shutil.copyfile(hist, copy)
    import resnet_graph.plotting as plotting
    drawn = {}
    real = plotting.plot_runs

    def spy(runs, out, responses=(), sources=None):
        drawn["sources"] = [str(s) for s in sources]
        return real(runs, out, responses, sources=sources)
    monkeypatch.setattr(plotting, "plot_runs", spy)
    # The same file under two spellings is read once; a copy elsewhere is a second source.
    result = invoke("plot", hist, root / "out" / ".." / "out" / "histories.h5", copy,
                    "--out", tmp_path / "fig")
    assert result.exit_code == 0, result.output
    assert drawn["sources"] == [str(hist), str(copy)]
    assert (tmp_path / "fig" / "final_accuracy.png").is_file()


def test_existing_run_is_refused_and_left_alone(trained):
    root, folder = trained
    hist = root / "out" / "histories.h5"
    before = hist.read_bytes()
    ckpt_before = (root / "out" / "preact-8" / "checkpoint").read_bytes()
    result = invoke("train", "preact", *TINY, "--data-dir", folder, "--out", root / "out")
    assert_one_line_error(result, "--resume")
    assert hist.read_bytes() == before
    assert (root / "out" / "preact-8" / "checkpoint").read_bytes() == ckpt_before


def test_bad_run_names_are_refused(tiny_data_dir, tmp_path):
    for name in ("a/b", "..", "x\x01y"):
        result = invoke("train", "original", *TINY, "--data-dir", tiny_data_dir,
                        "--out", tmp_path, "--name", name)
        assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def test_resume_through_the_cli(tiny_data_dir, tmp_path):
    args = ["train", "plain", *TINY, "--data-dir", tiny_data_dir, "--out", tmp_path, "--quiet"]
    assert invoke(*args).exit_code == 0
    result = invoke(*args, "--resume", "--epochs", "2")
    assert result.exit_code == 0, result.output
    run = history.read_run(tmp_path / "histories.h5", "plain-8")
    assert list(run.columns["epoch"]) == [1, 2]


def test_a_run_without_validation_split(tiny_data_dir, tmp_path):
    result = invoke("train", "plain", "--depth", "8", "--epochs", "1", "--batch-size", "50",
                    "--valid-size", "0", "--data-dir", tiny_data_dir, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    run = history.read_run(tmp_path / "histories.h5", "plain-8")
    assert run.epochs == 1 and run.columns["valid_acc"][0] != run.columns["valid_acc"][0]  # NaN
    shown = invoke("train", "plain", "--depth", "8", "--epochs", "1", "--batch-size", "50",
                   "--valid-size", "0", "--data-dir", tiny_data_dir, "--out", tmp_path / "shown")
    line = next(x for x in shown.stdout.splitlines() if x.startswith("epoch 1/1  train loss"))
    assert "no validation split" in line and "nan" not in line
    assert 0 <= run.attrs["test_acc"] <= 1
    result = invoke("eval", "--ckpt", tmp_path / "plain-8", "--split", "valid")
    assert_one_line_error(result, "no valid split")


def test_config_edited_to_another_depth_is_refused(trained, tmp_path):
    root, folder = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(root / "out" / "preact-8", run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["depth"] = 14
    (run_dir / "config.json").write_text(json.dumps(cfg))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert_one_line_error(invoke("eval", "--ckpt", run_dir, "--data-dir", folder),
                          "does not fit this model")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_damaged_checkpoint_is_named_as_damaged_with_the_intact_earlier_one(
        tiny_data_dir, tmp_path):
    """A data file cut short (a disk fault, a copy interrupted by hand) is not a model
    mismatch: the one line says the checkpoint is damaged and which earlier one is
    intact, and following its advice works; the resume refuses it the same way."""
    out = tmp_path / "out"
    args = ["train", "plain", "--depth", "8", "--epochs", "2", "--batch-size", "50",
            "--valid-size", "50", "--data-dir", tiny_data_dir, "--out", out, "--quiet"]
    assert invoke(*args).exit_code == 0
    run_dir = out / "plain-8"
    last = checkpoint.latest(run_dir)
    data_file = next(run_dir.glob(pathlib.Path(last).name + ".data-*"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    earlier = next(p for p in sorted(run_dir.glob("model.ckpt-*.index"))
                   if p.name != pathlib.Path(last).name + ".index").name[:-len(".index")]
    for result in (invoke("eval", "--ckpt", run_dir, "--data-dir", tiny_data_dir),
                   invoke(*args, "--resume", "--epochs", "3")):
        assert_one_line_error(result, f"checkpoint {last} is damaged", "cannot be read in full",
                              f"the earlier checkpoint {earlier} is intact",
                              f'model_checkpoint_path: "{earlier}"')
    # Cut to nothing, so that even the position cannot be read (what --resume --epochs and
    # experiment look at before anything is restored).
    data_file.write_bytes(b"")
    def experiment(epochs):
        return invoke("experiment", "--models", "plain", "--seeds", "0", "--depth", "8",
                      "--epochs", epochs, "--batch-size", "50", "--valid-size", "50",
                      "--data-dir", tiny_data_dir, "--out", tmp_path / "exp", "--quiet")
    assert experiment(2).exit_code == 0
    exp_run = tmp_path / "exp" / "plain-8-s0"
    exp_last = checkpoint.latest(exp_run)
    next(exp_run.glob(pathlib.Path(exp_last).name + ".data-*")).write_bytes(b"")
    for result in (invoke(*args, "--resume", "--epochs", "3"), experiment(3)):
        assert_one_line_error(result, "is damaged", "is intact")
    state = run_dir / "checkpoint"
    state.write_text(f'model_checkpoint_path: "{earlier}"\n')
    assert invoke("eval", "--ckpt", run_dir, "--data-dir", tiny_data_dir).exit_code == 0
    assert checkpoint.damage(str(run_dir / earlier)) is None
    assert checkpoint.damage(last)       # the reader's reason, e.g. a short read
    # (A checkpoint that reads in full but fits another model is still "does not fit":
    # test_config_edited_to_another_depth_is_refused.)


def test_config_json_that_is_not_an_object_is_refused(trained, tmp_path):
    root, folder = trained
    run_dir = tmp_path / "copy"
    shutil.copytree(root / "out" / "preact-8", run_dir)
    (run_dir / "config.json").write_text("[1, 2]")
    assert_one_line_error(invoke("eval", "--ckpt", run_dir, "--data-dir", folder),
                          "not a valid run config (it holds a JSON list")


def test_train_refuses_a_history_that_belongs_to_another_program(tiny_data_dir, tmp_path):
    foreign = tmp_path / "weights.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("kernel", data=np.ones((3, 3)))
    before = foreign.read_bytes()
    result = invoke("train", "original", *TINY, "--data-dir", tiny_data_dir,
                    "--out", tmp_path / "o", "--history", foreign)
    assert_one_line_error(result, "not a resnet-graph history")
    assert foreign.read_bytes() == before
    assert not (tmp_path / "o").exists()


def test_valid_size_larger_than_the_training_set(tiny_data_dir, tmp_path):
    result = invoke("train", "original", "--depth", "8", "--valid-size", "100000",
                    "--data-dir", tiny_data_dir, "--out", tmp_path / "o")
    assert_one_line_error(result, "--valid-size")
    assert not (tmp_path / "o").exists()


def test_unwritable_out(tiny_data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("train", "original", *TINY, "--data-dir", tiny_data_dir,
                    "--out", blocker / "runs")
    assert_one_line_error(result, "--out")
    assert blocker.read_text() == "not a folder"


def test_lr_boundaries_make_a_step_schedule(tiny_data_dir, tmp_path):
    result = invoke("train", "plain", "--depth", "8", "--epochs", "2", "--batch-size", "50",
                    "--valid-size", "50", "--optimizer", "momentum", "--lr", "0.1",
                    "--lr-boundaries", "3,6", "--data-dir", tiny_data_dir, "--out", tmp_path,
                    "--quiet")
    assert result.exit_code == 0, result.output
    run = history.read_run(tmp_path / "histories.h5", "plain-8")
    # 5 steps per epoch: the last step of epoch 1 is step 4 (lr 0.01), of epoch 2 step 9 (0.001).
    assert list(run.columns["lr"]) == pytest.approx([0.01, 0.001])
    assert run.attrs["config"]["lr_schedule"] == "step"


def test_a_layout_without_a_kernel_is_refused_before_anything_is_written(trained, tmp_path,
                                                                           monkeypatch):
    from resnet_graph import precision
    monkeypatch.setattr(precision, "kernel_problem",
                        lambda fmt, precision, xla=False: "no NCHW kernel" if fmt == "NCHW"
                        else None)
    _, folder = trained
    result = invoke("train", "original", *TINY, "--data-format", "NCHW", "--data-dir", folder,
                    "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "--data-format NCHW", "no NCHW kernel", "NHWC")
    assert not (tmp_path / "out").exists()


def test_nchw_without_onednn_trains_or_says_why_in_one_line(trained, tmp_path):
    """The real thing in a fresh process (TensorFlow reads the variable at import): on
    CPUs without oneDNN's NCHW kernels, a one-line refusal; where they exist, a run."""
    import os
    import subprocess
    import sys
    _, folder = trained
    exe = os.path.join(os.path.dirname(sys.executable), "resnet-graph")
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")
    proc = subprocess.run([exe, "train", "original", *TINY, "--train-examples", "50",
                           "--data-format", "NCHW", "--precision", "fp32",
                           "--data-dir", str(folder), "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 0:
        assert (tmp_path / "out" / "original-8" / "config.json").is_file()
    else:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("Error: --data-format NCHW"), lines
        assert "NHWC" in lines[0]
        assert not (tmp_path / "out").exists()


def test_a_diverging_fp16_run_stops_with_one_error_line(tiny_data_dir, tmp_path):
    """lr 1e6 (issue 26): after the first update every step overflows at every loss
    scale. The run stops when epoch 2 has skipped all its steps, with one Error line and
    no traceback; epoch 1's checkpoint and history row stay, and the run is marked failed."""
    result = CliRunner().invoke(cli, [str(a) for a in (
        "train", "original", "--depth", "8", "--precision", "fp16", "--optimizer", "momentum",
        "--lr", "1e6", "--epochs", "3", "--batch-size", "50", "--train-examples", "150",
        "--valid-size", "50", "--data-dir", tiny_data_dir, "--out", tmp_path, "--quiet")])
    assert_one_line_error(result, "fp16 loss scaling skipped every step of epoch 2",
                          "--precision fp32")
    run = history.read_run(tmp_path / "histories.h5", "original-8")
    assert run.epochs == 1 and run.attrs["status"] == "failed"
    assert run.columns["skipped_steps"][0] > 0
    assert checkpoint.latest(tmp_path / "original-8").endswith("model.ckpt-3")  # epoch 1's


def test_help_names_each_recipes_own_default_and_whole_summaries():
    text = " ".join(invoke("train", "--help").output.split())
    for key, option in (("valid_size", "--valid-size"), ("init", "--init"),
                        ("stride_padding", "--stride-padding")):
        values = {name: getattr(make_config("original", name), key) for name in RECIPES}
        assert len(set(values.values())) > 1, key      # else the help may say one value
        shown = "[recipe: " + ", ".join(f"{name} {v}" for name, v in values.items()) + "]"
        assert shown in text.split(option, 1)[1], (option, shown)
    # click cuts a command's summary at its first full stop: none may end at "et al."
    listing = invoke("--help").output.split("Commands:", 1)[1]
    assert all(not line.rstrip().endswith("al.") for line in listing.splitlines()), listing
    assert "responses" in listing and "plot" in listing
