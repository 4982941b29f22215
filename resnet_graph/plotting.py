"""PNG plots of training histories.

Uses ``matplotlib.figure.Figure`` with the Agg canvas directly, never pyplot,
so plotting neither needs a display nor changes matplotlib's global state.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from resnet_graph import history
from resnet_graph.errors import HistoryError, UserError
from resnet_graph.fsutil import atomic_write_bytes
from resnet_graph.history import Run

FIGSIZE = (8.0, 5.0)
DPI = 100
MARKER_MAX_EPOCHS = 25  # draw point markers when a run has at most this many epochs


def read_histories(paths, names: Sequence[str] | None = None) -> list[tuple[Path, Run]]:
    """The runs to plot of the history files ``paths``, each with its file: all the
    runs of a file, or those named in ``names``; a file given twice (the same resolved
    path) is read once; history.read_history's errors (another program's file, ...).
    """
    pairs, seen = [], set()
    for path in map(Path, paths):
        file = path.resolve()
        if file in seen:
            continue
        seen.add(file)
        pairs += [(path, run) for run in history.read_history(path)
                  if names is None or run.name in names]
    return pairs


def plot_runs(runs: Sequence[Run], out_dir, responses: Sequence[dict] = (),
              sources: Sequence | None = None) -> list[Path]:
    """Write the plots of ``runs`` into ``out_dir`` and return the written paths.

    Always ``loss.png`` and ``accuracy.png`` (train solid, validation dashed,
    one colour per model, or per model and depth when a model has several
    depths: the seeds of one model share it); ``error.png``, He et al.'s
    Fig. 6 (error against epoch, training dashed and validation bold, one panel
    per model family, one colour per depth); ``lr.png`` when a run has a
    learning rate; ``grad_norm.png`` when runs recorded gradient norms (each
    layer's, first and last epoch); for more than one run,
    ``final_accuracy.png``: the test accuracy per run when every run has one,
    else the last validation accuracy; and with ``responses`` (the objects of
    responses.json files), ``responses.png`` (Fig. 7). ``sources``: the history
    file of each run; runs of the same name from different files are then labelled
    ``<name> (<file>)``, <file> the shortest end of its path that tells the files
    apart (and the seeds of one model share a colour only within one file). Runs
    without finished epochs are left out; HistoryError when nothing is left to plot.
    """
    runs = list(runs)
    if not runs:
        raise HistoryError("no runs to plot: the history file has no runs; train a run first")
    plotted = [run for run in runs if run.epochs > 0]
    if not plotted:
        names = ", ".join(run.name for run in runs)
        raise HistoryError(
            f"no runs to plot: run {names} has no finished epochs yet; "
            "plot again after the first epoch"
        )
    out = _prepare_folder(out_dir)
    keys = _group_keys(plotted)
    if sources is not None:
        files = [source for run, source in zip(runs, sources) if run.epochs > 0]
        plotted, keys = _tell_files_apart(plotted, keys, files)
    palette = dict(zip(dict.fromkeys(keys), _colours(len(set(keys)))))
    colours = [palette[k] for k in keys]

    written = [
        _write_png(_loss_figure(plotted, colours, keys), out / "loss.png"),
        _write_png(_accuracy_figure(plotted, colours, keys), out / "accuracy.png"),
        _write_png(_error_figure(plotted), out / "error.png"),
    ]
    grad_figure = _grad_norm_figure(plotted)
    if grad_figure is not None:
        written.append(_write_png(grad_figure, out / "grad_norm.png"))
    if responses:
        written.append(_write_png(_responses_figure(list(responses)), out / "responses.png"))
    lr_figure = _lr_figure(plotted, colours)
    if lr_figure is not None:
        written.append(_write_png(lr_figure, out / "lr.png"))
    if len(plotted) > 1:
        bars = _final_accuracy_figure(plotted, colours)
        if bars is not None:
            written.append(_write_png(bars, out / "final_accuracy.png"))
    return written


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _loss_figure(runs: list[Run], colours: list, keys: list) -> Figure:
    fig, ax = _new_axes()
    markers = _use_markers(runs)
    for run, colour, label in zip(runs, colours, _first_labels(keys)):
        _curve(ax, run, "train_loss", colour, "-", label and f"{label} train", markers=markers)
        _curve(ax, run, "valid_loss", colour, "--", label and f"{label} valid", markers=markers)
    ax.set_title("Loss per epoch (train solid, validation dashed)")
    ax.set_ylabel("cross-entropy loss")
    _finish_epoch_axes(ax, runs)
    return fig


def _accuracy_figure(runs: list[Run], colours: list, keys: list) -> Figure:
    fig, ax = _new_axes()
    markers = _use_markers(runs)
    for run, colour, label in zip(runs, colours, _first_labels(keys)):
        _curve(ax, run, "train_acc", colour, "-", label and f"{label} train", markers=markers,
               scale=100.0)
        _curve(ax, run, "valid_acc", colour, "--", label and f"{label} valid", markers=markers,
               scale=100.0)
    ax.set_title("Accuracy per epoch (train solid, validation dashed)")
    ax.set_ylabel("accuracy (%)")
    _finish_epoch_axes(ax, runs)
    return fig


def _lr_figure(runs: list[Run], colours: list) -> Figure | None:
    with_lr = [
        (run, colour)
        for run, colour in zip(runs, colours)
        if "lr" in run.columns and np.isfinite(run.columns["lr"]).any()
    ]
    if not with_lr:
        return None
    fig, ax = _new_axes()
    values = []
    markers = _use_markers([run for run, _ in with_lr])
    for run, colour in with_lr:
        _curve(ax, run, "lr", colour, "-", run.name, markers=markers)
        lr = run.columns["lr"]
        values.append(lr[np.isfinite(lr)])
    finite = np.concatenate(values)
    # Log scale shows step schedules (a few levels, decades apart) well; a
    # cosine decay to ~0 would end in a cliff there, so it gets a linear axis.
    smooth = any(run.attrs.get("config", {}).get("lr_schedule") == "cosine"
                 for run, _ in with_lr)
    log = bool(len(finite)) and bool(np.all(finite > 0)) and not smooth
    if log:
        ax.set_yscale("log")
    ax.set_title("Learning rate per epoch")
    ax.set_ylabel("learning rate (log scale)" if log else "learning rate")
    _finish_epoch_axes(ax, [run for run, _ in with_lr])
    return fig


def _final_accuracy_figure(runs: list[Run], colours: list) -> Figure | None:
    test = [_finite_or_none(run.attrs.get("test_acc")) for run in runs]
    if all(value is not None for value in test):
        values = test
        what = "test accuracy"
    else:
        values = [_finite_or_none(run.columns["valid_acc"][-1]) for run in runs]
        what = "validation accuracy at the last epoch"
    pairs = [
        (run.name, value * 100.0, colour)
        for run, value, colour in zip(runs, values, colours)
        if value is not None
    ]
    if len(pairs) < 2:
        return None
    height = max(FIGSIZE[1], 1.2 + 0.4 * len(pairs))
    fig, ax = _new_axes(figsize=(FIGSIZE[0], height))
    positions = np.arange(len(pairs))
    bars = ax.barh(
        positions,
        [value for _, value, _ in pairs],
        color=[colour for _, _, colour in pairs],
        height=0.6,
    )
    ax.set_yticks(positions, labels=[name for name, _, _ in pairs])
    ax.invert_yaxis()  # first run on top
    ax.bar_label(bars, labels=[f"{value:.2f}%" for _, value, _ in pairs], padding=3)
    top = max(value for _, value, _ in pairs)
    ax.set_xlim(0, max(100.0, top) * 1.12)
    ax.set_xlabel(f"{what} (%)")
    ax.set_title(f"{what[0].upper()}{what[1:]} per run")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return fig


def _error_figure(runs: list[Run]) -> Figure:
    """He et al. 2015, Fig. 6: error (%) per epoch, training dashed and validation
    bold, one panel per model family (shared axes), one colour per depth; the final
    test error of a run as a star at its last epoch."""
    families = list(dict.fromkeys(_model_of(run) for run in runs))
    depths = sorted({d for d in (_depth_of(run) for run in runs) if d is not None})
    palette = dict(zip(depths, _colours(len(depths))))
    fig = Figure(figsize=(5.0 * len(families) + 1.0, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(families), sharex=True, sharey=True, squeeze=False)[0]
    markers = _use_markers(runs)
    for ax, family in zip(axes, families):
        members = [run for run in runs if _model_of(run) == family]
        labelled = set()
        for run in members:
            depth = _depth_of(run)
            colour = palette.get(depth, "grey")
            label = None if depth in labelled else (f"{depth} layers" if depth else run.name)
            labelled.add(depth)
            x = run.columns["epoch"]
            for column, style, width in (("train_acc", "--", 1.2), ("valid_acc", "-", 2.4)):
                y = 100.0 * (1.0 - np.asarray(run.columns[column], dtype=np.float64))
                ax.plot(x, np.where(np.isfinite(y), y, np.nan), linestyle=style,
                        linewidth=width, color=colour, marker="o" if markers else None,
                        markersize=2.5, label=label if column == "valid_acc" else None)
            test = _finite_or_none(run.attrs.get("test_acc"))
            if test is not None:
                ax.plot([x[-1]], [100.0 * (1.0 - test)], marker="*", markersize=11,
                        color=colour, linestyle="none")
        ax.set_title(_family_title(family))
        _epoch_axis(ax, runs)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="small", title="depth", framealpha=0.85)
    axes[0].set_ylabel("error (%)")
    fig.suptitle("Error per epoch: training dashed, validation bold, test error of the final "
                 "weights starred", fontsize=10)
    return fig


def _grad_norm_figure(runs: list[Run]) -> Figure | None:
    """Each weighted layer's gradient norm (history ``grad_norm``) against the layer
    index, at the first epoch (dashed) and the last (solid); one panel per model
    family, one colour per depth (or run), log scale."""
    with_grads = [run for run in runs if "grad_norm" in run.matrices
                  and np.isfinite(run.matrices["grad_norm"]).any()]
    if not with_grads:
        return None
    families = list(dict.fromkeys(_model_of(run) for run in with_grads))
    keys = [(_depth_of(run) or run.name) for run in with_grads]
    palette = dict(zip(dict.fromkeys(keys), _colours(len(set(keys)))))
    fig = Figure(figsize=(5.0 * len(families) + 1.0, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(families), sharey=True, squeeze=False)[0]
    for ax, family in zip(axes, families):
        labelled = set()
        for run, key in zip(with_grads, keys):
            if _model_of(run) != family:
                continue
            norms = run.matrices["grad_norm"]
            rows = [i for i in range(len(norms)) if np.isfinite(norms[i]).all()]
            if not rows:
                continue
            layers = np.arange(1, norms.shape[1] + 1)
            label = None if key in labelled else (f"{key} layers" if isinstance(key, int)
                                                  else str(key))
            labelled.add(key)
            first, last = rows[0], rows[-1]
            epochs = run.columns["epoch"]
            ax.plot(layers, norms[first], linestyle="--", linewidth=1.2, color=palette[key],
                    marker=".", label=None if label is None else
                    f"{label}, epoch {int(epochs[first])}")
            if last != first:
                ax.plot(layers, norms[last], linestyle="-", linewidth=1.8, color=palette[key],
                        marker=".", label=None if label is None else
                        f"{label}, epoch {int(epochs[last])}")
        ax.set_yscale("log")
        ax.set_title(_family_title(family))
        ax.set_xlabel("layer (1 = first convolution; last = dense)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="x-small", framealpha=0.85)
    axes[0].set_ylabel("gradient norm of the layer's kernel")
    fig.suptitle("Gradient norm per layer on the probe batch: first epoch dashed, last solid",
                 fontsize=10)
    return fig


def _responses_figure(responses: list[dict]) -> Figure:
    """He et al. 2015, Fig. 7: the std of each 3x3 layer's response, in layer order
    (top) and sorted by magnitude (bottom); one line per run, plain nets dashed."""
    fig = Figure(figsize=(9.0, 7.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    colours = _colours(len(responses))
    for entry, colour in zip(responses, colours):
        stds = np.array([layer["std"] for layer in entry["layers"]], dtype=np.float64)
        x = np.arange(1, len(stds) + 1)
        style = "--" if entry.get("model") == "plain" else "-"
        label = entry.get("run", "?")
        top.plot(x, stds, linestyle=style, color=colour, linewidth=1.4, label=label)
        bottom.plot(x, np.sort(stds)[::-1], linestyle=style, color=colour, linewidth=1.4,
                    label=label)
    top.set_xlabel("layer index (3x3 convolutions in network order)")
    bottom.set_xlabel("index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("std of the response")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small", ncol=2, framealpha=0.85)
    where = "after batch norm, before the addition and ReLU"
    if any(entry.get("model") == "preact" for entry in responses):
        where += "; preact's second convolutions: their own output"
    top.set_title(f"Std of each 3x3 layer's response on the test set\n({where}; "
                  "plain nets dashed)", fontsize=10)
    return fig


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _model_of(run: Run) -> str:
    model = run.attrs.get("config", {}).get("model")
    return str(model) if model else run.name


def _depth_of(run: Run) -> int | None:
    depth = run.attrs.get("config", {}).get("depth")
    return int(depth) if isinstance(depth, (int, float)) and not isinstance(depth, bool) else None


def _family_title(model: str) -> str:
    return {"plain": "plain", "original": "ResNet (original)",
            "preact": "ResNet (pre-activation)"}.get(model, model)


def _group_keys(runs: list[Run]) -> list[str]:
    """One key per run: its name without the ``-s<seed>`` that ``experiment`` appends
    (so the seeds of one model and depth share a colour and a legend entry), else
    its own name."""
    keys = []
    for run in runs:
        seed = run.attrs.get("config", {}).get("seed")
        suffix = f"-s{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else None
        keys.append(run.name[: -len(suffix)] if suffix and run.name.endswith(suffix)
                    and len(run.name) > len(suffix) else run.name)
    return keys


def _first_labels(keys: list[str]) -> list:
    """The legend label of each run: its group's key for the first run of the group,
    None for the others (one legend entry per group and split)."""
    seen, labels = set(), []
    for key in keys:
        labels.append(None if key in seen else key)
        seen.add(key)
    return labels


def _tell_files_apart(runs: list[Run], keys: list[str], sources: list) -> tuple[list, list]:
    """The runs (renamed) and group keys with `` (<file>)`` appended where the same name
    or key comes from more than one history file; <file> is the shortest end of the
    file's path that no other file shares. Names and keys unique to one file stay."""
    names = _apart([run.name for run in runs], sources)
    return ([dataclasses.replace(run, name=name) for run, name in zip(runs, names)],
            _apart(keys, sources))


def label_responses(entries: Sequence[dict], sources: Sequence) -> list[dict]:
    """The responses.json objects ``entries`` read from the files ``sources``, with
    ``run`` labelled ``<run> (<file>)`` where runs of the same name come from different
    files (as plot_runs does with its ``sources``)."""
    labels = _apart([entry["run"] for entry in entries], sources)
    return [dict(entry, run=label) for entry, label in zip(entries, labels)]


def _apart(labels: list[str], sources: Sequence) -> list[str]:
    """``labels`` with `` (<file>)`` appended where one label comes from more than one of
    the files ``sources`` (one per label); <file> is the shortest end of the file's path
    that no other file shares."""
    files = [Path(source).resolve() for source in sources]
    tails = {}
    for file in dict.fromkeys(files):
        others = [other.parts for other in set(files) - {file}]
        size = next(n for n in range(1, len(file.parts) + 1)
                    if all(other[-n:] != file.parts[-n:] for other in others))
        tails[file] = str(Path(*file.parts[-size:]))
    origins: dict[str, set] = {}
    for label, file in zip(labels, files):
        origins.setdefault(label, set()).add(file)
    return [f"{label} ({tails[file]})" if len(origins[label]) > 1 else label
            for label, file in zip(labels, files)]


def _new_axes(figsize=FIGSIZE):
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    return fig, ax


def _curve(
    ax, run: Run, column: str, colour, style: str, label: str, *, markers: bool,
    scale: float = 1.0,
):
    if column not in run.columns:
        return
    y = np.asarray(run.columns[column], dtype=np.float64) * scale
    y = np.where(np.isfinite(y), y, np.nan)  # an infinite loss would break the scale
    x = run.columns["epoch"]
    marker = "o" if markers else None
    ax.plot(
        x, y, linestyle=style, color=colour, label=label, linewidth=1.6,
        marker=marker, markersize=3,
    )


def _use_markers(runs: list[Run]) -> bool:
    """Point markers for short runs (a one-epoch line is otherwise invisible)."""
    return max(run.epochs for run in runs) <= MARKER_MAX_EPOCHS


def _epoch_axis(ax, runs: list[Run]) -> None:
    """Integer epoch ticks; when all runs have the same single epoch, one epoch of room
    either side (within the default margins the locator would fall back to fractions)."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = max(int(run.columns["epoch"][-1]) for run in runs)
    first = min(int(run.columns["epoch"][0]) for run in runs)
    if first == last:
        ax.set_xlim(first - 1, last + 1)


def _finish_epoch_axes(ax, runs: list[Run]) -> None:
    _epoch_axis(ax, runs)
    ax.grid(True, alpha=0.3)
    lines = len(ax.get_lines())
    ax.legend(
        loc="best",
        fontsize="small" if lines <= 8 else "x-small",
        ncol=1 if lines <= 8 else 2,
        framealpha=0.85,
    )


def _colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


def _finite_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_responses(path) -> dict:
    """A responses.json written by ``resnet-graph responses``; UserError if it is not one."""
    import json
    path = Path(path)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        stds = [float(layer["std"]) for layer in entry["layers"]]
        if not isinstance(entry["run"], str):
            raise ValueError("its run is not a name")
        if not stds or not all(math.isfinite(v) and v >= 0 for v in stds):
            raise ValueError("no finite standard deviations")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run 'resnet-graph responses --ckpt "
                        "RUN_DIR' first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path} is not a responses.json of resnet-graph responses "
                        f"({' '.join(str(exc).split())[:120]})") from None
    return entry


def _prepare_folder(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose another output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create folder {out}: {exc.strerror or exc}; choose another output folder"
        ) from exc
    return out


def _write_png(fig: Figure, target: Path) -> Path:
    """Render ``fig`` to a temp file next to ``target``, then move it into place."""
    try:
        with atomic_write_bytes(target) as handle:
            fig.savefig(handle, format="png", dpi=DPI)
    except OSError as exc:
        raise UserError(
            f"cannot write {target}: {exc.strerror or exc}; check free space and permissions"
        ) from exc
    return target


# --------------------------------------------------------------------------
# Figures of one evaluation: confusion matrix and example predictions
# --------------------------------------------------------------------------


def plot_evaluation(confusion, images, labels, predictions, class_names: Sequence[str],
                    out_dir, *, title: str = "", examples: int = 40) -> list[Path]:
    """Write ``confusion.png`` (row-normalised heat map with counts) and
    ``examples.png`` (the first ``examples`` images with predicted and true
    classes; mistakes in red) into ``out_dir``; return the paths."""
    out = _prepare_folder(out_dir)
    return [
        _write_png(_confusion_figure(np.asarray(confusion), class_names, title),
                   out / "confusion.png"),
        _write_png(_examples_figure(images[:examples], labels[:examples],
                                    predictions[:examples], class_names, title),
                   out / "examples.png"),
    ]


def _confusion_figure(confusion: np.ndarray, names: Sequence[str], title: str) -> Figure:
    fig, ax = _new_axes(figsize=(8.0, 7.0))
    totals = confusion.sum(axis=1, keepdims=True)
    rates = np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    k = len(names)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(confusion) / max(int(confusion.sum()), 1)
    ax.set_title(f"{title + ': ' if title else ''}confusion matrix, accuracy "
                 f"{100 * accuracy:.2f}% of {int(confusion.sum())} images")
    return fig


def _examples_figure(images, labels, predictions, names: Sequence[str], title: str) -> Figure:
    n = len(images)
    cols = 8
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(cols * 1.3, rows * 1.55 + 0.4), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        right = int(predictions[i]) == int(labels[i])
        ax.imshow(images[i], interpolation="nearest")
        colour = "black" if right else "red"
        ax.set_title(f"{names[int(predictions[i])]}\n" + ("" if right else f"(true {names[int(labels[i])]})"),
                     fontsize=7, color=colour)
        if not right:
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2.5)
    wrong = int(np.sum(np.asarray(predictions[:n]) != np.asarray(labels[:n])))
    fig.suptitle(f"{title + ': ' if title else ''}predicted class of the first {n} images "
                 f"({wrong} wrong, in red with the true class)", fontsize=9)
    return fig
