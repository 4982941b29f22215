"""A run says what it is before its first step; an experiment lists its plan first."""

from click.testing import CliRunner

from resnet_graph.cli import cli
from resnet_graph.config import TrainConfig
from resnet_graph.experiment import describe_plan, plan, run_experiment
from resnet_graph.precision import resolve_precision

TINY = ["--depth", "8", "--batch-size", "50", "--valid-size", "50"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def lines_before_first_step(output):
    lines = output.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("epoch "))
    return lines[:first]


def test_a_run_and_an_experiment_say_what_they_will_do_before_they_start(tiny_data_dir,
                                                                          tmp_path):
    out = tmp_path / "out"
    result = invoke("train", "original", *TINY, "--epochs", "1", "--name", "original-8-s0",
                    "--data-dir", tiny_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    what, where = lines_before_first_step(result.stdout)
    auto = resolve_precision("auto")
    assert what.startswith(f"original-8-s0: original depth 8, seed recipe, 1 epochs x 5 steps of "
                           f"50 images; precision {auto} (auto), layout NHWC (auto), XLA off; "
                           "CPU: ")
    assert what.endswith("; 1 tower, 1 worker")
    assert where == (f"original-8-s0: a new run, starting at epoch 1; 250 training / 50 "
                     f"validation / 100 test images from {tiny_data_dir}; run folder "
                     f"{out / 'original-8-s0'}, history {out / 'histories.h5'}")

    # The plan of an experiment in that folder: the run is finished at 1 epoch, and
    # would resume after its epoch 1 at 2 epochs; the others are to train.
    base = TrainConfig(depth=8, epochs=1, batch_size=50, valid_size=50)
    assert describe_plan(out, plan(base.replace(epochs=2), ["original", "plain"], [0])) == [
        f"experiment in {out}: 2 runs (1 to train, 1 to resume)",
        "  [1/2] original-8-s0 (2 epochs, seed recipe): to resume after epoch 1",
        "  [2/2] plain-8-s0 (2 epochs, seed recipe): to train",
    ]
    logged = []
    run_experiment(plan(base, ["original"], [0]), out, data_dir=tiny_data_dir, quiet=True,
                   log=logged.append)
    assert logged[:3] == [f"experiment in {out}: 1 run (1 finished, kept)",
                          "  [1/1] original-8-s0 (1 epochs, seed recipe): finished, kept",
                          "[1/1] original-8-s0: finished, kept as it is"]

    result = invoke("train", "original", "--resume", "--name", "original-8-s0", "--epochs", "2",
                    "--data-dir", tiny_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    what, where = lines_before_first_step(result.stdout)
    assert "2 epochs x 5 steps of 50 images" in what and f"precision {auto} (the run's)" in what
    assert where.startswith(f"resuming original-8-s0 after epoch 1 from "
                            f"{out / 'original-8-s0' / 'model.ckpt-5'}; 250 training / 50 "
                            "validation")
    assert "epoch 2/2" in result.stdout


def test_a_cosine_warm_up_as_long_as_the_run_is_pointed_out(tiny_data_dir, tmp_path):
    # `fast` warms up over 2 epochs: a run of 2 epochs or fewer never decays.
    result = invoke("train", "original", *TINY, "--recipe", "fast", "--epochs", "1",
                    "--data-dir", tiny_data_dir, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    lines = lines_before_first_step(result.stdout)
    assert len(lines) == 3 and lines[2] == (
        "original-8: the cosine warm-up (2 epochs) is as long as the run (1), so the rate "
        "rises to 0.2 and never decays; pass --warmup-epochs below 1 to decay")
    result = invoke("train", "original", *TINY, "--recipe", "fast", "--epochs", "1",
                    "--warmup-epochs", "0.5", "--data-dir", tiny_data_dir, "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert len(lines_before_first_step(result.stdout)) == 2
