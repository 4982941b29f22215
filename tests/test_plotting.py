"""Tests of resnet_graph.plotting: PNG plots of histories."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from resnet_graph import history, plotting
from resnet_graph.errors import HistoryError, UserError
from resnet_graph.history import Run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(name: str, epochs: int, *, best: float = 0.9, test_acc=None, lr=True) -> Run:
    e = np.arange(1, epochs + 1, dtype=np.int64)
    progress = 1.0 - np.exp(-e / 4.0)
    columns = {
        "epoch": e,
        "train_loss": 2.3 * np.exp(-e / 5.0) + (1.0 - best),
        "train_acc": best * progress,
        "valid_loss": 2.4 * np.exp(-e / 6.0) + 0.1,
        "valid_acc": (best - 0.05) * progress,
        "lr": np.where(e < epochs * 0.5, 0.1, 0.01) if lr else np.full(epochs, np.nan),
        "seconds": np.full(epochs, 12.5),
    }
    attrs = {"config": {"name": name}}
    if test_acc is not None:
        attrs["test_acc"] = test_acc
    return Run(name=name, columns=columns, attrs=attrs)


# The figures with one panel per model family grow with the families (5 inches each + 1).
PANELS = {"error.png", "grad_norm.png"}


def assert_png(path: Path, size=(500, 800)) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    if path.name in PANELS:
        assert image.shape[0] == 480 and (image.shape[1] - 100) % 500 == 0, image.shape
    else:
        assert image.shape[:2] == size


def test_writes_all_plots_for_several_runs(tmp_path):
    runs = [fake_run("resnet20", 12, best=0.91, test_acc=0.905),
            fake_run("resnet32", 10, best=0.93, test_acc=0.921)]
    out = tmp_path / "figures" / "nested"
    written = plotting.plot_runs(runs, out)
    names = [p.name for p in written]
    assert names == ["loss.png", "accuracy.png", "error.png", "lr.png", "final_accuracy.png"]
    for path in written:
        assert path.parent == out
        assert_png(path)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left


def test_single_run_has_no_bar_chart(tmp_path):
    written = plotting.plot_runs([fake_run("only", 5)], tmp_path)
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "error.png", "lr.png"]


def test_without_learning_rate_no_lr_plot(tmp_path):
    written = plotting.plot_runs([fake_run("a", 4, lr=False), fake_run("b", 4, lr=False)],
                                 tmp_path)
    assert "lr.png" not in [p.name for p in written]
    assert "final_accuracy.png" in [p.name for p in written]


def test_lines_labels_and_styles():
    runs = [fake_run("a", 6), fake_run("b", 3)]
    colours = plotting._colours(2)
    fig = plotting._accuracy_figure(runs, colours, plotting._group_keys(runs))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"a train", "a valid", "b train", "b valid"}
    assert lines["a train"].get_linestyle() == "-"
    assert lines["a valid"].get_linestyle() == "--"
    assert lines["a train"].get_color() == lines["a valid"].get_color()
    assert lines["a train"].get_color() != lines["b train"].get_color()
    np.testing.assert_array_equal(lines["b valid"].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(lines["a train"].get_ydata(), runs[0].columns["train_acc"] * 100)
    assert "%" in ax.get_ylabel()
    assert ax.get_legend() is not None


def test_lr_axis_is_log_when_positive():
    fig = plotting._lr_figure([fake_run("a", 8)], plotting._colours(1))
    assert fig.axes[0].get_yscale() == "log"
    run = fake_run("zero", 3)
    run.columns["lr"] = np.array([0.1, 0.0, 0.0])
    fig = plotting._lr_figure([run], plotting._colours(1))
    assert fig.axes[0].get_yscale() == "linear"
    cosine = fake_run("cosine", 8)
    cosine.attrs["config"]["lr_schedule"] = "cosine"
    cosine.columns["lr"] = 0.05 * (1 + np.cos(np.pi * np.arange(8) / 8))
    fig = plotting._lr_figure([cosine], plotting._colours(1))
    assert fig.axes[0].get_yscale() == "linear"   # a decay to ~0 is no cliff on a linear axis


def test_final_accuracy_prefers_test_then_validation():
    with_test = [fake_run("a", 5, test_acc=0.8), fake_run("b", 5, test_acc=0.7)]
    fig = plotting._final_accuracy_figure(with_test, plotting._colours(2))
    ax = fig.axes[0]
    assert "test accuracy" in ax.get_xlabel()
    widths = [patch.get_width() for patch in ax.patches]
    np.testing.assert_allclose(widths, [80.0, 70.0])
    mixed = [fake_run("a", 5, test_acc=0.8), fake_run("b", 5)]
    fig = plotting._final_accuracy_figure(mixed, plotting._colours(2))
    ax = fig.axes[0]
    assert "validation" in ax.get_xlabel()
    expected = [run.columns["valid_acc"][-1] * 100 for run in mixed]
    np.testing.assert_allclose([p.get_width() for p in ax.patches], expected)


def test_selection_from_a_history_file(tmp_path):
    path = tmp_path / "h.h5"
    for name, epochs in (("a", 3), ("b", 2), ("c", 0)):
        history.create_run(path, name, config={})
        run = fake_run(name, epochs)
        for i in range(epochs):
            history.append_epoch(path, name, {k: v[i] for k, v in run.columns.items()})
    selected = history.read_history(path, ["b"])
    written = plotting.plot_runs(selected, tmp_path / "one")
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "error.png", "lr.png"]
    # "c" has no epochs yet: it is skipped, the two others are plotted
    written = plotting.plot_runs(history.read_history(path), tmp_path / "all")
    assert "final_accuracy.png" in [p.name for p in written]
    for p in written:
        assert_png(p)


def test_no_runs_is_a_history_error(tmp_path):
    with pytest.raises(HistoryError, match="no runs to plot"):
        plotting.plot_runs([], tmp_path)
    with pytest.raises(HistoryError, match="no runs to plot.*no finished epochs"):
        plotting.plot_runs([fake_run("empty", 0)], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_one_epoch_and_nonfinite_values_do_not_crash(tmp_path):
    run = fake_run("short", 1)
    run.columns["train_loss"] = np.array([np.inf])
    diverged = fake_run("nan", 4)
    diverged.columns["valid_loss"] = np.array([1.0, np.nan, np.inf, np.nan])
    for p in plotting.plot_runs([run, diverged], tmp_path):
        assert_png(p)


def test_many_runs(tmp_path):
    runs = [fake_run(f"r{i}", 5 + i, best=0.5 + i / 50) for i in range(12)]
    written = plotting.plot_runs(runs, tmp_path)
    colours = plotting._colours(12)
    assert len({tuple(c) for c in colours}) == 12
    assert_png(written[0])


def test_output_folder_is_a_file(tmp_path):
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        plotting.plot_runs([fake_run("a", 2)], target)


def test_existing_plots_are_replaced(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"old")
    plotting.plot_runs([fake_run("a", 3)], tmp_path)
    assert_png(tmp_path / "loss.png")


def test_an_hdf5_file_that_is_not_a_history_says_so(tmp_path):
    import h5py
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(HistoryError, match="is an HDF5 file but not a resnet-graph history"):
        plotting.read_histories([other])
    # A history whose runs were all removed keeps the message of plot_runs.
    empty = tmp_path / "empty.h5"
    history.create_run(empty, "gone", config={})
    history.remove_run(empty, "gone")
    assert plotting.read_histories([empty]) == []
    with pytest.raises(HistoryError, match="the history file has no runs"):
        plotting.plot_runs([], tmp_path / "out")


def test_runs_of_one_name_in_several_files_get_distinct_labels(tmp_path, monkeypatch):
    for folder, best in (("a", 0.9), ("b", 0.8)):
        path = tmp_path / folder / "histories.h5"
        for name in ("original-8", f"only-{folder}"):
            history.create_run(path, name, config={"model": "original", "depth": 8})
            run = fake_run(name, 3, best=best)
            for i in range(3):
                history.append_epoch(path, name, {k: v[i] for k, v in run.columns.items()})
    a, b = tmp_path / "a" / "histories.h5", tmp_path / "b" / "histories.h5"
    # The same file twice (spelled differently) is read once.
    pairs = plotting.read_histories([a, b, tmp_path / "b" / ".." / "a" / "histories.h5"])
    assert [(path, run.name) for path, run in pairs] == [
        (a, "original-8"), (a, "only-a"), (b, "original-8"), (b, "only-b")]
    figures = {}

    def keep(fig, target):
        figures[target.name] = fig
        return target

    monkeypatch.setattr(plotting, "_write_png", keep)
    plotting.plot_runs([run for _, run in pairs], tmp_path / "out",
                       sources=[path for path, _ in pairs])
    bars = [t.get_text() for t in figures["final_accuracy.png"].axes[0].get_yticklabels()]
    assert bars == ["original-8 (a/histories.h5)", "only-a", "original-8 (b/histories.h5)",
                    "only-b"]
    legend = [t.get_text() for t in figures["accuracy.png"].axes[0].get_legend().get_texts()]
    assert legend[:2] == ["original-8 (a/histories.h5) train",
                          "original-8 (a/histories.h5) valid"]
    assert len(set(legend)) == len(legend) == 8
    lines = figures["accuracy.png"].axes[0].get_lines()
    assert lines[0].get_color() != lines[4].get_color()
    # Without a collision nothing changes.
    runs = [run for path, run in pairs if run.name.startswith("only")]
    renamed, keys = plotting._tell_files_apart(runs, plotting._group_keys(runs), [a, b])
    assert [run.name for run in renamed] == keys == ["only-a", "only-b"]


def test_responses_title_names_preact_second_convolutions_only_with_preact():
    layers = [{"std": v} for v in (1.0, 2.0)]
    plain = [{"run": "plain-8", "model": "plain", "layers": layers}]
    preact = plain + [{"run": "preact-8", "model": "preact", "layers": layers}]
    title = plotting._responses_figure(plain).axes[0].get_title()
    assert "after batch norm" in title and "preact" not in title
    title = plotting._responses_figure(preact).axes[0].get_title()
    assert "preact's second convolutions: their own output" in title


def test_one_epoch_has_integer_epoch_ticks():
    runs = [fake_run("a", 1), fake_run("b", 1)]
    runs[0].attrs["config"].update(model="plain", depth=8)
    runs[1].attrs["config"].update(model="original", depth=8)
    keys = plotting._group_keys(runs)
    for fig in (plotting._error_figure(runs), plotting._lr_figure(runs, plotting._colours(2)),
                plotting._loss_figure(runs, plotting._colours(2), keys)):
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert len(ticks) and np.all(ticks == np.round(ticks)), ticks


def test_responses_of_same_named_runs_in_different_folders_are_told_apart(tmp_path):
    entries = [{"run": "original-8", "model": "original", "layers": [{"std": 1.0}]},
               {"run": "original-8", "model": "original", "layers": [{"std": 0.5}]},
               {"run": "plain-8", "model": "plain", "layers": [{"std": 0.7}]}]
    files = [tmp_path / "a" / "original-8" / "responses.json",
             tmp_path / "b" / "original-8" / "responses.json",
             tmp_path / "a" / "plain-8" / "responses.json"]
    labelled = plotting.label_responses(entries, files)
    assert [e["run"] for e in labelled] == [
        f"original-8 ({Path('a', 'original-8', 'responses.json')})",
        f"original-8 ({Path('b', 'original-8', 'responses.json')})", "plain-8"]
    assert [e["layers"] for e in labelled] == [e["layers"] for e in entries]
    legend = plotting._responses_figure(labelled).axes[0].get_legend()
    assert len({t.get_text() for t in legend.get_texts()}) == 3


@pytest.mark.parametrize("text, fragment", [
    ('{"layers": [{"std": 1.0}]}', "'run'"),                 # no run name
    ('{"run": 3, "layers": [{"std": 1.0}]}', "not a name"),
    ('{"run": "r", "layers": []}', "no finite"),
    ('{"run": "r", "layers": [{"std": -1}]}', "no finite"),
    ("[1, 2]", ""),
])
def test_files_that_are_not_responses_are_one_user_error(tmp_path, text, fragment):
    path = tmp_path / "responses.json"
    path.write_text(text)
    with pytest.raises(UserError, match="is not a responses.json") as caught:
        plotting.read_responses(path)
    assert fragment in str(caught.value)
