"""The issue-17 headline runs as markdown tables, from the files experiments/finals.sh writes.

    .venv/bin/python experiments/finals_table.py [FINALS_DIR]      # default checkpoints/finals

Per run (from ``histories.h5`` and the ``<run>/eval-<variant>.json`` files): best and final
validation accuracy, test accuracy of the final and of the best-validation checkpoint, each
single view and with ``--tta flip``, and the wall-clock of the epochs; then per model the
mean and spread (max - min) over the seeds that have each number; then, for every run with a
``original`` run of the same depth and seed, the paired difference (run - original) of each
accuracy column; then the issue's targets against the ``original`` means (``--target-single``,
``--target-flip``). With ``--files`` ROOT
holds ``finals-<model>.h5`` history copies (as kept in docs/runs/) and no eval JSONs, so
only the history columns are filled. Only numbers found in the files are printed.
"""

import argparse
import json
import pathlib
import statistics

import h5py

COLUMNS = ("best valid", "final valid", "test final", "test final, flip", "test best-valid",
           "test best-valid, flip", "wall-clock min")


def read_history(path: pathlib.Path) -> dict:
    """run name -> {column: value} from one history file (accuracies in percent)."""
    runs = {}
    with h5py.File(path, "r") as f:
        for name, group in f.items():
            if not isinstance(group, h5py.Group) or "epoch" not in group:
                continue
            valid = group["valid_acc"][()]
            row = {"epochs": int(len(group["epoch"])),
                   "wall-clock min": float(group["seconds"][()].sum()) / 60}
            if len(valid):
                row["best valid"] = 100 * float(valid.max())
                row["final valid"] = 100 * float(valid[-1])
            for attr, column in (("test_acc", "test final"), ("best_test_acc", "test best-valid")):
                if attr in group.attrs:
                    row[column] = 100 * float(group.attrs[attr])
            runs[name] = row
    return runs


def read_evals(run_dir: pathlib.Path, row: dict) -> None:
    for variant, column in (("final", "test final"), ("final-flip", "test final, flip"),
                            ("best", "test best-valid"), ("best-flip", "test best-valid, flip")):
        path = run_dir / f"eval-{variant}.json"
        if path.is_file():
            row[column] = 100 * float(json.loads(path.read_text())["accuracy"])


def split_name(name: str):
    """``preact-32-s1`` -> (``preact``, ``32``, ``1``); None for names of another shape."""
    stem, _, seed = name.rpartition("-s")
    model, _, depth = stem.rpartition("-")
    if not (model and depth.isdigit() and seed.isdigit()):
        return None
    return model, depth, seed


def paired_differences(runs: dict) -> dict:
    """run name -> {column: run - original of the same depth and seed} for the accuracy columns
    both runs have; runs without such an ``original`` (and ``original`` itself) are left out."""
    out = {}
    for name, row in runs.items():
        parts = split_name(name)
        if parts is None or parts[0] == "original":
            continue
        base = runs.get(f"original-{parts[1]}-s{parts[2]}")
        if base is None:
            continue
        out[name] = {c: row[c] - base[c] for c in COLUMNS[:-1] if c in row and c in base}
    return out


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default="checkpoints/finals")
    p.add_argument("--files", action="store_true",
                   help="ROOT holds finals-*.h5 history copies instead of an experiment folder")
    p.add_argument("--target-single", type=float, default=89.0,
                   help="target for the mean test accuracy of original, single view (percent)")
    p.add_argument("--target-flip", type=float, default=90.0,
                   help="the same with --tta flip (percent)")
    args = p.parse_args(argv)
    root = pathlib.Path(args.root)
    paths = sorted(root.glob("finals-*.h5")) if args.files else [root / "histories.h5"]
    runs = {}
    for path in paths:
        if path.is_file():
            runs.update(read_history(path))
    if not runs:
        raise SystemExit(f"no runs in {root}")
    if not args.files:
        for name, row in runs.items():
            read_evals(root / name, row)

    print("| run | epochs | " + " | ".join(COLUMNS) + " |")
    print("| --- | --- |" + " --- |" * len(COLUMNS))
    for name, row in sorted(runs.items()):
        cells = [fmt(row.get(c), 1 if c.startswith("wall") else 2) for c in COLUMNS]
        print(f"| {name} | {row['epochs']} | " + " | ".join(cells) + " |")

    print()
    print("| model | " + " | ".join(f"{c} (mean, spread, n)" for c in COLUMNS[:-1]) + " |")
    print("| --- |" + " --- |" * (len(COLUMNS) - 1))
    by_model = {}
    for name, row in runs.items():
        by_model.setdefault(name.rsplit("-s", 1)[0], []).append(row)
    for model, rows in sorted(by_model.items()):
        cells = []
        for c in COLUMNS[:-1]:
            values = [r[c] for r in rows if c in r]
            cells.append("-" if not values else
                         f"{statistics.mean(values):.2f} ({max(values) - min(values):.2f}, "
                         f"{len(values)})")
        print(f"| {model} | " + " | ".join(cells) + " |")

    diffs = paired_differences(runs)
    if diffs:
        print()
        print("| run - original, same seed | " + " | ".join(COLUMNS[:-1]) + " |")
        print("| --- |" + " --- |" * (len(COLUMNS) - 1))
        for name, diff in sorted(diffs.items()):
            cells = ["-" if c not in diff else f"{diff[c]:+.2f}" for c in COLUMNS[:-1]]
            print(f"| {name} | " + " | ".join(cells) + " |")

    print()
    for model, rows in sorted(by_model.items()):
        if not model.startswith("original-"):
            continue
        for column, target in (("test final", args.target_single),
                               ("test final, flip", args.target_flip)):
            values = [r[column] for r in rows if column in r]
            if values:
                mean = statistics.mean(values)
                verdict = "met" if mean >= target else f"missed by {target - mean:.2f}"
                print(f"{model} {column}: mean {mean:.2f} over {len(values)} seed(s), "
                      f"target {target:.1f}: {verdict}")


if __name__ == "__main__":
    main()
