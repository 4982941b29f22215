"""The write-up's comparison in one call: several models (and seeds), one history, a report.

:func:`run_experiment` trains each planned run in turn into ``<out>/`` (run
folders ``<model>-<depth>-s<seed>`` and one ``histories.h5``), then
:func:`write_report` draws every run into ``loss.png``/``accuracy.png`` and
writes ``report.md`` (for people) and ``report.json`` (for scripts).

Called again after an interruption it picks up where it stopped: finished
runs are kept, an unfinished one resumes from its latest checkpoint, and the
runs not started yet start. A run whose options differ from the ones asked for
is refused, so one folder never mixes two set-ups.
"""

import dataclasses
import json
import math
import pathlib
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np

from . import checkpoint, history
from .config import RUN_FACTS, SCHEDULE_STATE, TrainConfig, canonical_model
from .errors import TrainingInterrupted, UserError
from .fsutil import atomic_write_text
from .stats import no_spread, paired_difference

HISTORY_FILE = "histories.h5"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
# Keys of config.json that are not the set-up: the run's name and length, where a
# lengthening restarted its decay (config.SCHEDULE_STATE), and the facts of the machine
# and the data (config.RUN_FACTS).
NOT_SETUP = {"name", "epochs"} | SCHEDULE_STATE | RUN_FACTS


def run_name(model: str, depth: int, seed: int) -> str:
    return f"{canonical_model(model)}-{depth}-s{seed}"


def plan(base: TrainConfig, models: Sequence[str], seeds: Sequence[int],
         depths: Optional[Sequence[int]] = None) -> list:
    """One config per (depth, model, seed), depths outermost (so an unfinished sweep
    has every model of its shallower depths), then models, in the order given.
    ``depths``: None for ``base.depth`` alone."""
    depths = [base.depth] if depths is None else list(depths)
    if not models or not seeds or not depths:
        raise UserError("an experiment needs at least one model, one seed and one depth")
    names = [canonical_model(m) for m in models]
    if len(set(names)) != len(names) or len(set(seeds)) != len(seeds) \
            or len(set(depths)) != len(depths):
        raise UserError("each model, each seed and each depth may be named once")
    try:
        return [base.replace(model=m, depth=d, seed=s, name=run_name(m, d, s))
                for d in depths for m in names for s in seeds]
    except ValueError as e:   # an option that one of the models (or depths) refuses
        raise UserError(str(e)) from None


def run_state(out: pathlib.Path, cfg: TrainConfig, *, guard: bool = True) -> str:
    """``new``, ``partial``, ``finished``, ``failed`` or ``lost`` (unfinished in the
    history, but its run folder with the checkpoints is gone) for run ``cfg.name``.
    ``guard``: as in history.read_history (False once the file has been vetted)."""
    path = out / HISTORY_FILE
    started = (out / cfg.name / "config.json").is_file()
    if not path.exists() or not history.has_run(path, cfg.name, guard=guard):
        return "partial" if started else "new"
    run = history.read_run(path, cfg.name, guard=guard)
    if run.attrs.get("status") == "failed":
        return "failed"
    if "test_acc" in run.attrs and run.epochs >= cfg.epochs:
        return "finished"
    return "partial" if started else "lost"


def check_same_setup(out: pathlib.Path, cfg: TrainConfig) -> None:
    """Refuse a run of ``out`` that was started with other options than ``cfg``: as its
    config.json says or, where its run folder is gone, the config its history recorded."""
    if (out / cfg.name / checkpoint.CONFIG_FILE).is_file():
        saved = checkpoint.read_config(out / cfg.name)
    else:
        saved = history.read_run(out / HISTORY_FILE, cfg.name, guard=False).attrs["config"]
    try:
        # An option the run's version did not have yet took its default (the behaviour
        # of that version), so compare with the default, not skip it.
        saved = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass
    wanted = cfg.to_dict()
    differ = sorted(k for k in wanted if k not in NOT_SETUP and k in saved
                    and saved[k] != wanted[k])
    if differ:
        what = ", ".join(f"{k} {saved[k]!r} (asked {wanted[k]!r})" for k in differ)
        raise UserError(f"run {cfg.name} in {out} was started with other options: {what}; "
                        "ask for the same options or choose another --out")


def run_experiment(configs: Sequence[TrainConfig], out, *, data_dir=None, quiet: bool = False,
                   log: Callable[[str], None] = print, command: str = "",
                   devices: Optional[int] = None) -> dict:
    """Train every run of ``configs`` that is not finished, then write the report;
    ``devices``: towers per run (as train_run's: default 1, or a resumed run's)."""
    from .runs import train_run  # TensorFlow only when training
    from .train import TrainingError
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / HISTORY_FILE).exists():
        # A history that was there before (perhaps from elsewhere) is read once in a
        # forked child with a time limit; from then on it is the file these runs write.
        history.run_names(out / HISTORY_FILE, guard=True)
    for cfg in configs:   # every run that is there, before any is trained
        if run_state(out, cfg, guard=False) in ("finished", "failed", "partial"):
            check_same_setup(out, cfg)
    for line in describe_plan(out, configs):
        log(line)
    for i, cfg in enumerate(configs, 1):
        state = run_state(out, cfg, guard=False)
        where = f"[{i}/{len(configs)}] {cfg.name}"
        if state in ("finished", "failed"):
            log(f"{where}: {state}, kept as it is")
            continue
        if state == "partial":
            log(f"{where}: continuing from its latest checkpoint")
        elif state == "lost":
            history.remove_run(out / HISTORY_FILE, cfg.name)
            log(f"{where}: unfinished and its run folder is gone; training it again from "
                f"the start ({cfg.epochs} epochs)")
        else:
            log(f"{where}: training {cfg.epochs} epochs ({cfg.recipe} recipe)")
        try:
            train_run(cfg, data_dir=data_dir, out=out, history_path=out / HISTORY_FILE,
                      resume=state == "partial", epochs_override=cfg.epochs,
                      quiet=quiet, log=log, devices=devices)
        except TrainingError as e:   # e.g. NaN loss: recorded in the history, go on
            log(f"{where}: failed: {e}")
        except TrainingInterrupted as e:
            raise TrainingInterrupted(
                f"{str(e).split(';')[0]}; run the same experiment command again to continue "
                "(finished runs are kept)", e.signal_number) from None
    return write_report(out, configs, command=command, guard=False)


PLANNED = {"new": "to train", "partial": "to resume", "lost": "to train again",
           "finished": "finished, kept", "failed": "failed, kept"}


def describe_plan(out: pathlib.Path, configs: Sequence[TrainConfig]) -> list:
    """What :func:`run_experiment` is about to do, before it trains anything: a header
    and one line per run (train, resume after epoch k, train again, keep)."""
    states = [run_state(out, cfg, guard=False) for cfg in configs]
    counts = ", ".join(f"{states.count(s)} {PLANNED[s]}" for s in PLANNED if s in states)
    lines = [f"experiment in {out}: {len(configs)} run{'' if len(configs) == 1 else 's'} "
             f"({counts})"]
    for i, (cfg, state) in enumerate(zip(configs, states), 1):
        what = PLANNED[state]
        if state == "partial":
            try:
                done = checkpoint.epochs_done(out / cfg.name)
            except UserError:
                done = None
            what += (f" after epoch {done}" if done is not None
                     else " (no checkpoint yet: from epoch 1)")
        elif state == "lost":
            what += " from epoch 1 (its run folder is gone)"
        lines.append(f"  [{i}/{len(configs)}] {cfg.name} ({cfg.epochs} epochs, {cfg.recipe} "
                     f"recipe): {what}")
    return lines


# -- the report ---------------------------------------------------------------------------
@dataclasses.dataclass
class RunRow:
    """What the report says of one run (accuracies are fractions)."""

    name: str
    model: str
    depth: int
    seed: int
    status: str
    epochs: int
    params: Optional[int]
    best_valid_acc: float
    best_epoch: Optional[int]
    final_train_loss: float
    final_train_acc: float
    final_valid_acc: float
    test_acc: float
    best_test_acc: float
    wall_clock_seconds: float
    images_per_sec: float
    device: str
    precision: str


def _finite(values) -> list:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def run_row(run: Optional[history.Run], cfg: TrainConfig, status: str,
            params: Optional[int]) -> RunRow:
    nan = float("nan")
    if run is None:
        return RunRow(cfg.name, cfg.model, cfg.depth, cfg.seed, status, 0, params, nan, None,
                      nan, nan, nan, nan, nan, 0.0, nan, "", "")
    cols, attrs = run.columns, run.attrs
    valid = np.asarray(cols["valid_acc"], dtype=np.float64)
    has_valid = bool(np.isfinite(valid).any())
    best_i = int(np.nanargmax(valid)) if has_valid else None
    speeds = _finite(cols.get("images_per_sec", []))
    return RunRow(
        name=cfg.name, model=cfg.model, depth=cfg.depth, seed=cfg.seed, status=status,
        epochs=run.epochs,
        params=params,
        best_valid_acc=float(valid[best_i]) if has_valid else nan,
        best_epoch=int(cols["epoch"][best_i]) if has_valid else None,
        final_train_loss=float(cols["train_loss"][-1]) if run.epochs else nan,
        final_train_acc=float(cols["train_acc"][-1]) if run.epochs else nan,
        final_valid_acc=float(valid[-1]) if run.epochs else nan,
        test_acc=float(attrs.get("test_acc", nan)),
        best_test_acc=float(attrs.get("best_test_acc", attrs.get("test_acc", nan))),
        wall_clock_seconds=float(np.sum(cols["seconds"])),
        images_per_sec=float(np.mean(speeds)) if speeds else nan,
        device=str(attrs.get("device", "")), precision=str(attrs.get("precision", "")))


def parameter_counts(configs: Sequence[TrainConfig]) -> dict:
    """Trainable parameters per (model, depth), counted from the graph."""
    from .inspection import model_summary
    counts = {}
    for cfg in configs:
        key = (cfg.model, cfg.depth)
        if key not in counts:
            counts[key] = model_summary(cfg)["params"]
    return counts


def collect(out, configs: Sequence[TrainConfig], params: Optional[dict] = None, *,
            guard: bool = True) -> list:
    out = pathlib.Path(out)
    path = out / HISTORY_FILE
    names = set(history.run_names(path, guard=guard)) if path.exists() else set()
    params = params or {}
    rows = []
    for cfg in configs:
        run = history.read_run(path, cfg.name, guard=False) if cfg.name in names else None
        rows.append(run_row(run, cfg, run_state(out, cfg, guard=False),
                            params.get((cfg.model, cfg.depth))))
    return rows


def mean_std(values) -> tuple:
    """(mean, sample standard deviation or None for one value, count) of the finite values."""
    values = _finite(values)
    if not values:
        return float("nan"), None, 0
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None,
            len(values))


def _pct(value, std=None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _plain(value, std=None, fmt="{:.0f}") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return fmt.format(value) + (f" ± {fmt.format(std)}" if std is not None else "")


def _duration(seconds) -> str:
    if not math.isfinite(seconds) or seconds <= 0:
        return "-"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.2f} h"


SUMMARY_FIELDS = ("best_valid_acc", "final_train_loss", "final_train_acc", "final_valid_acc",
                  "test_acc", "best_test_acc", "wall_clock_seconds", "images_per_sec")


def group_key(row: RunRow, rows: Sequence[RunRow]) -> str:
    """What the report groups a run under: its model, or ``<model>-<depth>`` when the
    experiment has several depths."""
    return row.model if len({r.depth for r in rows}) == 1 else f"{row.model}-{row.depth}"


def summarise(rows: Sequence[RunRow]) -> dict:
    """Per model (and depth): mean, std and count of each field over its finished runs."""
    by_model = {}
    for row in rows:
        by_model.setdefault(group_key(row, rows), []).append(row)
    summary = {}
    for model, runs in by_model.items():
        done = [r for r in runs if r.status == "finished"]
        summary[model] = {f: dict(zip(("mean", "std", "n"), mean_std(getattr(r, f) for r in done)))
                          for f in SUMMARY_FIELDS}
        summary[model]["model"] = runs[0].model
        summary[model]["depth"] = runs[0].depth
        summary[model]["runs"] = len(runs)
        summary[model]["finished"] = len(done)
        summary[model]["params"] = runs[0].params
        summary[model]["epochs"] = sorted({r.epochs for r in done})
    return summary


# What the comparisons compare: errors (1 - accuracy) of the finished runs.
COMPARED = (("test_error", "test_acc"), ("train_error", "final_train_acc"))


def comparisons(rows: Sequence[RunRow]) -> list:
    """Paired differences of errors between groups that share seeds: at each depth,
    every later model minus every earlier one (in --models order); for each model,
    every depth minus the next shallower one. Each with its 95% t interval (n - 1
    degrees of freedom), or "one seed: not resolved"."""
    done = [r for r in rows if r.status == "finished"]
    models = list(dict.fromkeys(r.model for r in rows))
    depths = sorted({r.depth for r in rows})

    def values(model, depth, field):
        return {r.seed: 1.0 - getattr(r, field) for r in done
                if r.model == model and r.depth == depth}

    pairs = [("model", (a, d), (b, d)) for d in depths
             for i, a in enumerate(models) for b in models[i + 1:]]
    pairs += [("depth", (m, d0), (m, d1)) for m in models for d0, d1 in zip(depths, depths[1:])]
    out = []
    for kind, (ma, da), (mb, db) in pairs:
        for metric, field in COMPARED:
            diff = paired_difference(values(mb, db, field), values(ma, da, field))
            if diff is None:
                continue
            out.append({"kind": kind, "a": f"{ma}-{da}", "b": f"{mb}-{db}", "metric": metric,
                        "difference": diff.mean, "low": diff.low, "high": diff.high,
                        "level": diff.level, "seeds": list(diff.seeds), "n": diff.n,
                        "resolved": diff.resolved, "verdict": diff.verdict()})
    return out


def _signed_pct(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:+.2f}"


def _comparison_cell(c: dict) -> str:
    if c["n"] < 2:
        return f"{_signed_pct(c['difference'])} (one seed: not resolved)"
    if no_spread(c["low"], c["high"]):
        return f"{_signed_pct(c['difference'])} n={c['n']}, no spread over the seeds: not resolved"
    return (f"{_signed_pct(c['difference'])} [{_signed_pct(c['low'])}, {_signed_pct(c['high'])}]"
            f" n={c['n']}: {'resolved' if c['resolved'] else 'not resolved'}")


def _error_lines(summary: dict) -> list:
    """One row per model and depth: the errors of the degradation question, in %."""
    lines = ["## Errors by model and depth", "",
             "Errors in % (100 - accuracy): training error and loss of the last epoch (on the "
             "augmented batches, as trained), validation error of the last epoch, test error of "
             "the final weights; best validation accuracy of any epoch.", "",
             "| model | depth | runs | final train loss | final train error | "
             "final valid error | test error | best valid acc | wall-clock |",
             "|" + " --- |" * 9]
    for s in summary.values():
        def err(field):
            m = s[field]
            return _pct(1.0 - m["mean"], m["std"]) if m["n"] else "-"
        lines.append(
            f"| {s['model']} | {s['depth']} | {s['finished']}/{s['runs']} | "
            f"{_plain(s['final_train_loss']['mean'], s['final_train_loss']['std'], '{:.4f}')} | "
            f"{err('final_train_acc')} | {err('final_valid_acc')} | {err('test_acc')} | "
            f"{_pct(s['best_valid_acc']['mean'], s['best_valid_acc']['std'])} | "
            f"{_duration(s['wall_clock_seconds']['mean'])} |")
    return lines


def _comparison_lines(compared: list) -> list:
    if not compared:
        return []
    lines = ["", "## Paired differences", "",
             "Differences of error in percentage points (b - a; negative: b has the lower "
             "error), over the seeds both have, with the 95% t interval (n - 1 degrees of "
             "freedom). A difference is resolved when its interval excludes 0; with one seed "
             "there is no interval and nothing is resolved.", "",
             "| a | b | test error b - a | train error b - a |", "| --- | --- | --- | --- |"]
    by_pair = {}
    for c in compared:
        by_pair.setdefault((c["kind"], c["a"], c["b"]), {})[c["metric"]] = c
    for (kind, a, b), metrics in by_pair.items():
        cells = [_comparison_cell(metrics[m]) if m in metrics else "-"
                 for m, _ in COMPARED]
        lines.append(f"| {a} | {b} | {cells[0]} | {cells[1]} |")
    return lines


def format_report(rows: Sequence[RunRow], configs: Sequence[TrainConfig], command: str,
                  figures: Sequence[str] = ("loss.png", "accuracy.png")) -> str:
    cfg = configs[0]
    summary = summarise(rows)
    depths = sorted({c.depth for c in configs})
    lines = [f"# Experiment: {cfg.recipe} recipe, depth{'s' if len(depths) > 1 else ''} "
             f"{', '.join(map(str, depths))}", ""]
    if command:
        lines += ["```", command, "```", ""]
    devices = sorted({r.device for r in rows if r.device})
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
              f"Device: {', '.join(devices) or '-'}. Accuracies in %, over "
              f"the {cfg.valid_size:,} validation images and the test split; "
              "with several seeds, mean ± sample standard deviation. Wall-clock is the sum of the "
              "epochs' times (training and validation). `test (best)` is the test accuracy of "
              "the checkpoint with the best validation accuracy.", ""]
    lines += ["| model | params | runs | best valid | final valid | test (final) | test (best) | "
              "epochs | wall-clock | images/s |", "|" + " --- |" * 10]
    for model, s in summary.items():
        wall = s["wall_clock_seconds"]
        lines.append(
            f"| {model} | {s['params'] if s['params'] else '-'} | {s['finished']}/{s['runs']} | "
            f"{_pct(s['best_valid_acc']['mean'], s['best_valid_acc']['std'])} | "
            f"{_pct(s['final_valid_acc']['mean'], s['final_valid_acc']['std'])} | "
            f"{_pct(s['test_acc']['mean'], s['test_acc']['std'])} | "
            f"{_pct(s['best_test_acc']['mean'], s['best_test_acc']['std'])} | "
            f"{', '.join(map(str, s['epochs'])) or '-'} | {_duration(wall['mean'])} | "
            f"{_plain(s['images_per_sec']['mean'], s['images_per_sec']['std'])} |")
    for model in summary:
        lines += ["", f"## {model}", "",
                  "| run | seed | status | epochs | best valid (epoch) | final valid | "
                  "test (final) | test (best) | wall-clock | images/s | precision |",
                  "|" + " --- |" * 11]
        for r in (r for r in rows if group_key(r, rows) == model):
            best = f"{_pct(r.best_valid_acc)} ({r.best_epoch})" if r.best_epoch else "-"
            lines.append(
                f"| {r.name} | {r.seed} | {r.status} | {r.epochs} | {best} | "
                f"{_pct(r.final_valid_acc)} | {_pct(r.test_acc)} | {_pct(r.best_test_acc)} | "
                f"{_duration(r.wall_clock_seconds)} | {_plain(r.images_per_sec)} | "
                f"{r.precision or '-'} |")
    lines += [""] + _error_lines(summary) + _comparison_lines(comparisons(rows))
    if figures:
        lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in figures) + "."]
    return "\n".join(lines) + "\n"


def write_report(out, configs: Sequence[TrainConfig], *, command: str = "",
                 guard: bool = True) -> dict:
    """Draw the runs and write report.md and report.json; return the report as a dict.
    ``guard``: as in history.read_history (False for the history an experiment wrote)."""
    from .plotting import plot_runs, read_responses
    out = pathlib.Path(out)
    rows = collect(out, configs, parameter_counts(configs), guard=guard)
    path = out / HISTORY_FILE
    names = [r.name for r in rows if r.epochs]
    runs = history.read_history(path, names, guard=False) if names else []
    responses = [read_responses(out / n / "responses.json") for n in names
                 if (out / n / "responses.json").is_file()]
    figures = [str(p) for p in plot_runs(runs, out, responses)] if names else []
    atomic_write_text(out / REPORT_MD, format_report(rows, configs, command,
                                                     [pathlib.Path(f).name for f in figures]))
    run_objects = [_json_ready(dataclasses.asdict(r)) for r in rows]
    models = _json_ready(summarise(rows))
    for model, entry in models.items():   # each model with its per-seed runs and summary
        entry["per_seed"] = [o for r, o in zip(rows, run_objects) if group_key(r, rows) == model]
    depths = sorted({c.depth for c in configs})
    report = {"recipe": configs[0].recipe, "depth": configs[0].depth, "depths": depths,
              "command": command, "runs": run_objects, "models": models,
              "comparisons": _json_ready(comparisons(rows)), "figures": figures,
              "report": str(out / REPORT_MD)}
    atomic_write_text(out / REPORT_JSON, json.dumps(report, indent=2))
    return report


def _json_ready(value):
    """NaN -> None, recursively, so that the JSON is strict."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
