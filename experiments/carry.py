"""Carry an `experiment` folder across machines: the files a long run needs to resume, small
enough to commit (docs/runs/<name>/), and back.

    .venv/bin/python experiments/carry.py save checkpoints/finals docs/runs/finals
    .venv/bin/python experiments/carry.py restore docs/runs/finals checkpoints/finals
    .venv/bin/python experiments/carry.py save --lean checkpoints/sweep docs/runs/sweep

`save` copies, from an experiment folder: ``histories.h5`` (under its lock, so never half a
rewrite), ``report.md``/``report.json`` and the report's figures (``*.png``), and per run
folder ``config.json``, the latest checkpoint (its ``.index`` and ``.data-*`` files, with a
``checkpoint`` state file naming only it), ``best/`` (its checkpoint and ``best.json``) and
the ``eval-*.json`` files of experiments/finals.sh and the ``responses*.json`` of
``resnet-graph responses``. With ``--lean``, a finished run keeps no checkpoint (neither
latest nor best: its history, config and results are what the docs read), so that the
checkpoints of the unfinished runs can be committed. Left out: older checkpoints, TensorBoard event
files, locks and logs. Files already in DEST that the source no longer has (an older
checkpoint) are removed, so DEST is a snapshot. Every file is written to a temporary name
and renamed.

`restore` copies such a snapshot into an experiment folder, only into run folders that are
missing there (it never overwrites a run that exists), and the history file only when the
folder has none. Then the same `resnet-graph experiment` command (or experiments/finals.sh)
resumes each unfinished run from its carried checkpoint.

Checkpoints are not committed (.gitignore), except in ``docs/runs/sweep/`` (the issue-25
depth sweep, which takes several sessions: its lean snapshot carries the unfinished runs'
checkpoints, a few MB each, so that a new machine resumes them). Elsewhere a snapshot in a
fresh clone holds only the history, configs and evaluations: its finished runs are restored without checkpoints (their
config and evaluations; `experiment` keeps a finished run by its history), and its
unfinished runs are not restored and start again. The checkpoints carry
only where the snapshot folder itself survives (the same machine handed back).

A run folder's checkpoint state file stores relative paths (the Saver is made with
``save_relative_paths=True``), so a carried folder works wherever it is put.
"""

import argparse
import os
import pathlib
import re
import shutil
import sys

from resnet_graph import fsutil, history

HISTORY = "histories.h5"
TOP_FILES = (HISTORY, "report.md", "report.json")
STATE = "checkpoint"
BEST = "best"
_LATEST = re.compile(r'^model_checkpoint_path:\s*"(.+)"\s*$', re.MULTILINE)


def latest_prefix(folder: pathlib.Path):
    """The checkpoint prefix the state file of ``folder`` names as latest, or None."""
    try:
        match = _LATEST.search((folder / STATE).read_text(encoding="utf-8"))
    except OSError:
        return None
    if not match or os.path.isabs(match.group(1)):
        return None
    prefix = match.group(1)
    return prefix if (folder / f"{prefix}.index").is_file() else None


def checkpoint_files(folder: pathlib.Path, prefix: str):
    return sorted(p for p in folder.iterdir()
                  if p.name == f"{prefix}.index" or p.name.startswith(f"{prefix}.data-"))


def copy_atomic(src: pathlib.Path, dst: pathlib.Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_atomic(dst: pathlib.Path, text: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_text(dst, text)


def snapshot_checkpoint(src: pathlib.Path, dst: pathlib.Path) -> list:
    """Copy the latest checkpoint of ``src`` into ``dst`` with a state file naming it only."""
    prefix = latest_prefix(src)
    if prefix is None:
        return []
    kept = []
    for path in checkpoint_files(src, prefix):
        copy_atomic(path, dst / path.name)
        kept.append(path.name)
    write_atomic(dst / STATE, f'model_checkpoint_path: "{prefix}"\n'
                              f'all_model_checkpoint_paths: "{prefix}"\n')
    kept.append(STATE)
    return kept


def prune(folder: pathlib.Path, kept: set) -> None:
    """Remove the files of ``folder`` (not its subfolders) that the snapshot did not write."""
    for path in folder.iterdir():
        if path.is_file() and path.name not in kept:
            path.unlink()


def save(src: pathlib.Path, dst: pathlib.Path, lean: bool = False) -> int:
    if not (src / HISTORY).is_file():
        raise SystemExit(f"error: {src} has no {HISTORY}: not an experiment folder")
    live = sorted(dst.glob("*/.lock"))
    if live:
        raise SystemExit(f"error: {dst} is an experiment folder that trains (it has {live[0]}), "
                         "not a snapshot: save writes FROM the experiment folder TO the snapshot")
    dst.mkdir(parents=True, exist_ok=True)
    with fsutil.exclusive_lock(history.lock_path(src / HISTORY), timeout=600):
        copy_atomic(src / HISTORY, dst / HISTORY)
    top = {HISTORY}
    for path in [*(src / name for name in TOP_FILES[1:]), *sorted(src.glob("*.png"))]:
        if path.is_file():
            copy_atomic(path, dst / path.name)
            top.add(path.name)
    runs = 0
    for run in sorted(p for p in src.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        out = dst / run.name
        checkpoints = not (lean and finished(src / HISTORY, run.name))
        kept = set(snapshot_checkpoint(run, out)) if checkpoints else set()
        for path in [run / "config.json", *sorted(run.glob("eval-*.json")),
                     *sorted(run.glob("responses*.json"))]:
            copy_atomic(path, out / path.name)
            kept.add(path.name)
        prune(out, kept)
        if (run / BEST).is_dir():
            best_kept = set(snapshot_checkpoint(run / BEST, out / BEST)) if checkpoints else set()
            if (run / BEST / "best.json").is_file():
                copy_atomic(run / BEST / "best.json", out / BEST / "best.json")
                best_kept.add("best.json")
            prune(out / BEST, best_kept)
        runs += 1
        print(f"{run.name}: {latest_prefix(out) or ('no checkpoint yet' if checkpoints else 'finished, no checkpoint kept (--lean)')}")
    for path in dst.iterdir():
        if path.is_file() and path.name not in top:
            path.unlink()
        elif path.is_dir() and not (src / path.name / "config.json").is_file():
            shutil.rmtree(path)
    print(f"saved {runs} run folder(s) of {src} into {dst}")
    return runs


def finished(path: pathlib.Path, name: str) -> bool:
    """Whether the history file ``path`` holds run ``name`` with its test results (which
    `train` writes once the last epoch is done)."""
    try:
        return "test_acc" in history.read_run(path, name).attrs
    except history.HistoryError:
        return False


def restore(src: pathlib.Path, dst: pathlib.Path) -> int:
    if not (src / HISTORY).is_file():
        raise SystemExit(f"error: {src} has no {HISTORY}: not a snapshot made by 'carry.py save'")
    dst.mkdir(parents=True, exist_ok=True)
    if (dst / HISTORY).exists():
        print(f"{dst / HISTORY} exists: kept as it is")
    else:
        copy_atomic(src / HISTORY, dst / HISTORY)
    restored = 0
    for run in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / run.name
        if out.exists():
            print(f"{out} exists: kept as it is")
            continue
        if latest_prefix(run) is None:
            # Checkpoints stay out of git (.gitignore), so a snapshot from a clone has none.
            # A finished run is kept by `experiment` from its history: restore its config and
            # evaluations (experiments/finals.sh then skips them). An unfinished one trains again
            # from its start, so a folder without its checkpoint would only be in the way.
            if not finished(dst / HISTORY, run.name):
                print(f"{run.name}: unfinished and no checkpoint in the snapshot: not restored "
                      "(it trains again from its start)")
                continue
            note = "finished; config and evaluations only, no checkpoint"
        else:
            note = latest_prefix(run)
        with fsutil.replacing_folder(out) as tmp:   # complete or absent, even if killed
            shutil.copytree(run, tmp)
        restored += 1
        print(f"{run.name}: restored ({note})")
    print(f"restored {restored} run folder(s) into {dst}")
    return restored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("src", type=pathlib.Path)
    p.add_argument("dst", type=pathlib.Path)
    p.add_argument("--lean", action="store_true",
                   help="save: no checkpoints for finished runs (only the unfinished resume)")
    args = p.parse_args(argv)
    if not args.src.is_dir():
        raise SystemExit(f"error: {args.src} is not a folder")
    if args.action == "save":
        save(args.src, args.dst, lean=args.lean)
    else:
        restore(args.src, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
