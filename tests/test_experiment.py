"""`resnet-graph experiment`: several runs into one history, a report, resume after a stop."""

import json
import shutil
import signal

import numpy as np
import pytest
from click.testing import CliRunner

from resnet_graph import experiment, history, train
from resnet_graph.cli import cli
from resnet_graph.config import make_config, recipe_values
from resnet_graph.errors import TrainingInterrupted, UserError

TINY = ["--depth", "8", "--epochs", "2", "--batch-size", "50", "--valid-size", "50"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data_dir):
    """Two models x two seeds on tiny data, through the CLI."""
    out = tmp_path_factory.mktemp("exp") / "out"
    result = invoke("experiment", "--recipe", "fast", "--models", "original,cnn",
                    "--seeds", "0,1", *TINY, "--data-dir", tiny_data_dir, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_every_run_lands_in_one_history(finished):
    out, report = finished
    names = history.run_names(out / "histories.h5")
    assert sorted(names) == ["original-8-s0", "original-8-s1", "plain-8-s0", "plain-8-s1"]
    for name in names:
        run = history.read_run(out / "histories.h5", name)
        assert run.epochs == 2 and "test_acc" in run.attrs and "best_test_acc" in run.attrs
        assert run.attrs["config"]["recipe"] == "fast"
        assert run.attrs["config"]["seed"] == int(name[-1])
    for figure in ("loss.png", "accuracy.png", "report.md", "report.json"):
        assert (out / figure).stat().st_size > 0
    assert {r["status"] for r in report["runs"]} == {"finished"}


def test_report_numbers_come_from_the_history(finished):
    out, report = finished
    runs = {r["name"]: r for r in report["runs"]}
    for name, row in runs.items():
        run = history.read_run(out / "histories.h5", name)
        assert row["test_acc"] == pytest.approx(run.attrs["test_acc"])
        assert row["best_valid_acc"] == pytest.approx(float(np.max(run.columns["valid_acc"])))
        assert row["final_valid_acc"] == pytest.approx(float(run.columns["valid_acc"][-1]))
        assert row["wall_clock_seconds"] == pytest.approx(float(np.sum(run.columns["seconds"])))
    for model in ("original", "plain"):
        accs = [runs[f"{model}-8-s{s}"]["test_acc"] for s in (0, 1)]
        summary = report["models"][model]["test_acc"]
        assert summary["mean"] == pytest.approx(np.mean(accs))
        assert summary["std"] == pytest.approx(np.std(accs, ddof=1))
        assert summary["n"] == 2
        assert report["models"][model]["params"] > 0
        per_seed = report["models"][model]["per_seed"]
        assert [r["seed"] for r in per_seed] == [0, 1]
        assert [r["test_acc"] for r in per_seed] == accs
    text = (out / "report.md").read_text()
    assert "| original |" in text and "| plain |" in text and "original-8-s1" in text
    mean, std = 100 * report["models"]["plain"]["test_acc"]["mean"], \
        100 * report["models"]["plain"]["test_acc"]["std"]
    assert f"{mean:.2f} ± {std:.2f}" in text


def test_running_it_again_keeps_finished_runs(finished, tiny_data_dir):
    out, _ = finished
    before = {n: history.read_run(out / "histories.h5", n).attrs["test_acc"]
              for n in history.run_names(out / "histories.h5")}
    result = invoke("experiment", "--recipe", "fast", "--models", "original,cnn",
                    "--seeds", "0,1", *TINY, "--data-dir", tiny_data_dir, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished, kept as it is") == 4
    after = {n: history.read_run(out / "histories.h5", n).attrs["test_acc"] for n in before}
    assert after == before


def test_other_options_in_the_same_folder_are_refused(finished, tiny_data_dir, tmp_path):
    out, _ = finished
    configs = experiment.plan(make_config("original", "fast", depth=8, epochs=3, batch_size=50,
                                          valid_size=50, lr=0.5), ["original"], [0])
    trained = recipe_values("fast")["lr"]        # the run in ``finished`` took the recipe's
    with pytest.raises(UserError, match=f"other options: lr {trained} .asked 0.5."):
        experiment.check_same_setup(out, configs[0])
    # Through the command, for finished runs too, before any run is trained; and from
    # the history's config where the run folder is gone.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "plain-8-s1")
    before = (copy / "histories.h5").read_bytes()
    for models, seeds, first in (("original,cnn", "0,1", "original-8-s0"), ("cnn", "1", "plain-8-s1")):
        result = invoke("experiment", "--recipe", "fast", "--models", models, "--seeds", seeds,
                        *TINY, "--data-dir", tiny_data_dir, "--out", copy, "--lr", "0.5")
        assert result.exit_code == 1, result.output
        assert f"run {first} in {copy} was started with other options: lr" in result.stderr
    assert (copy / "histories.h5").read_bytes() == before


def test_a_lengthened_run_is_kept_when_the_command_runs_again(finished, tiny_data_dir, tmp_path):
    """``--epochs`` past a cosine run's length restarts its decay and the trainer records
    where (decay_from_step/decay_from_lr in config.json and the history's config): state
    of the schedule, not an option, so the same command runs again (to continue after a
    stop, or to rewrite the report) instead of refusing the run as set up otherwise."""
    out, _ = finished
    copy = tmp_path / "lengthened"
    shutil.copytree(out, copy)
    path = copy / "original-8-s0" / "config.json"
    saved = json.loads(path.read_text())
    saved.update(decay_from_step=3, decay_from_lr=0.05)
    path.write_text(json.dumps(saved))
    history.set_attrs(copy / "histories.h5", "original-8-s0", config=saved)
    result = invoke("experiment", "--recipe", "fast", "--models", "original,cnn",
                    "--seeds", "0,1", *TINY, "--data-dir", tiny_data_dir, "--out", copy)
    assert result.exit_code == 0, result.output
    assert result.output.count("finished, kept as it is") == 4
    # An option does still count.
    base = make_config("original", "fast", depth=8, epochs=2, batch_size=50, valid_size=50)
    with pytest.raises(UserError, match="other options: init 'glorot' .asked 'he'."):
        experiment.check_same_setup(copy, base.replace(name="original-8-s0", init="he"))


def test_an_option_older_than_the_run_counts_as_its_default(finished, tmp_path):
    # A run folder of a version without --init trained glorot (the default then and now).
    out, _ = finished
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    path = copy / "original-8-s0" / "config.json"
    saved = json.loads(path.read_text())
    del saved["init"]
    path.write_text(json.dumps(saved))
    base = make_config("original", "fast", depth=8, epochs=2, batch_size=50, valid_size=50)
    experiment.check_same_setup(copy, base.replace(name="original-8-s0"))
    with pytest.raises(UserError, match="other options: init 'glorot' .asked 'he'."):
        experiment.check_same_setup(copy, base.replace(name="original-8-s0", init="he"))


def test_an_interrupted_experiment_continues_where_it_stopped(tiny_data_dir, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "exp"
    base = make_config("original", "fast", depth=8, epochs=2, batch_size=50, valid_size=50)
    configs = experiment.plan(base, ["original", "preact"], [0])

    def stop_in_preact(self, epoch, step):
        if self.cfg.name == "preact-8-s0" and (epoch, step) == (2, 1):
            self.request_stop(signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "after_step", stop_in_preact)
    with pytest.raises(TrainingInterrupted, match="run the same experiment command again"):
        experiment.run_experiment(configs, out, data_dir=tiny_data_dir, quiet=True,
                                  log=lambda s: None)
    assert experiment.run_state(out, configs[0]) == "finished"
    assert experiment.run_state(out, configs[1]) == "partial"
    first = history.read_run(out / "histories.h5", "original-8-s0").attrs["test_acc"]
    monkeypatch.undo()
    lines = []
    report = experiment.run_experiment(configs, out, data_dir=tiny_data_dir, quiet=True,
                                       log=lines.append)
    assert lines[1:3] == ["  [1/2] original-8-s0 (2 epochs, fast recipe): finished, kept",
                          "  [2/2] preact-8-s0 (2 epochs, fast recipe): to resume after epoch 1"]
    assert lines[3].endswith("finished, kept as it is")
    assert "continuing from its latest checkpoint" in lines[4]
    run = history.read_run(out / "histories.h5", "preact-8-s0")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs
    assert history.read_run(out / "histories.h5", "original-8-s0").attrs["test_acc"] == first
    assert [r["status"] for r in report["runs"]] == ["finished", "finished"]


def test_an_unfinished_run_whose_folder_is_gone_starts_again(tiny_data_dir, tmp_path,
                                                             monkeypatch):
    # As when only histories.h5 was kept (e.g. copied to another machine) mid-run.
    out = tmp_path / "exp"
    base = make_config("original", "fast", depth=8, epochs=2, batch_size=50, valid_size=50)
    configs = experiment.plan(base, ["preact"], [0])

    def stop_in_epoch_2(self, epoch, step):
        if (epoch, step) == (2, 1):
            self.request_stop(signal.SIGTERM)

    monkeypatch.setattr(train.Trainer, "after_step", stop_in_epoch_2)
    with pytest.raises(TrainingInterrupted):
        experiment.run_experiment(configs, out, data_dir=tiny_data_dir, quiet=True,
                                  log=lambda s: None)
    monkeypatch.undo()
    assert history.read_run(out / "histories.h5", "preact-8-s0").epochs == 1
    shutil.rmtree(out / "preact-8-s0")
    assert experiment.run_state(out, configs[0]) == "lost"
    lines = []
    report = experiment.run_experiment(configs, out, data_dir=tiny_data_dir, quiet=True,
                                       log=lines.append)
    assert lines[1] == ("  [1/1] preact-8-s0 (2 epochs, fast recipe): to train again from "
                        "epoch 1 (its run folder is gone)")
    assert "run folder is gone; training it again" in lines[2]
    run = history.read_run(out / "histories.h5", "preact-8-s0")
    assert list(run.columns["epoch"]) == [1, 2] and "test_acc" in run.attrs
    assert [r["status"] for r in report["runs"]] == ["finished"]


def test_remove_run_deletes_one_run_and_keeps_the_others(tmp_path):
    path = tmp_path / "h.h5"
    for name in ("a", "b"):
        history.create_run(path, name, config={"model": name})
    history.remove_run(path, "a")
    assert history.run_names(path) == ["b"]
    with pytest.raises(history.HistoryError, match="run a not in"):
        history.remove_run(path, "a")


def test_a_failed_run_is_reported_and_the_rest_go_on(tiny_data_dir, tmp_path):
    out = tmp_path / "exp"
    # lr 1e30 makes the loss NaN in the first steps (the NaN guard stops the run).
    base = make_config("original", "seed", depth=8, epochs=1, batch_size=50, valid_size=50,
                       lr=1e30, optimizer="momentum")
    configs = experiment.plan(base, ["plain", "original"], [0])
    lines = []
    report = experiment.run_experiment(configs, out, data_dir=tiny_data_dir, quiet=True,
                                       log=lines.append)
    assert [r["status"] for r in report["runs"]] == ["failed", "failed"]
    assert sum("failed: loss became" in line for line in lines) == 2
    assert "| plain | 75290 | 0/1 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--models", "original,resnet"], "name models from"),
    (["--models", "original,original"], "each model, each seed"),
    (["--seeds", "0,x"], "not a comma-separated list"),
    (["--seeds", "1,1"], "distinct seeds"),
])
def test_bad_experiment_options(args, message, tmp_path):
    result = CliRunner().invoke(cli, ["experiment", *args, "--out", str(tmp_path)])
    assert result.exit_code in (1, 2)
    assert message in result.output


def test_an_experiment_trains_every_run_on_the_towers_asked_for(tiny_data_dir, tmp_path):
    out = tmp_path / "towers"
    result = invoke("experiment", "--recipe", "fast", "--models", "plain", *TINY, "--epochs",
                    "1", "--devices", "2", "--data-dir", tiny_data_dir, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "plain-8-s0" / "config.json").read_text())["devices"] == 2
    assert history.read_run(out / "histories.h5", "plain-8-s0").attrs["devices"] == 2
