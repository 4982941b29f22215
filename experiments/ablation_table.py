"""The issue-17 ablation as one markdown table, from the arms' history files.

    .venv/bin/python experiments/ablation_table.py [ABLATION_DIR]     # default checkpoints/ablation
    .venv/bin/python experiments/ablation_table.py docs/runs --files --write docs/results.md

Reads ``<dir>/<arm>/histories.h5`` of every arm that experiments/ablation.sh runs (or a copy
of them, e.g. docs/runs/ablation-<arm>.h5 with ``--files``), takes the finished runs
(a ``test_acc`` attribute) and prints, per arm: the seeds, the final test accuracy of
each, their mean, the spread (max - min), the mean difference from ``base`` over the
seeds both finished (and how many of those seeds are ahead),
the best validation accuracy and the wall-clock per run. Unfinished runs are listed
as such. Only numbers in the files are printed. ``--write FILE`` puts the table between
the ``<!-- ablation:begin -->`` and ``<!-- ablation:end -->`` lines of FILE instead.
"""

import argparse
import contextlib
import datetime
import io
import pathlib
import statistics

import h5py

BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
NOTE = ("Test accuracy is the final checkpoint's, on the 10,000 test images; best valid is "
        "over the 5,000 held-out images. Read on {date} from the histories "
        "(`experiments/ablation_table.py`).")

ARMS = {  # arm -> the flags experiments/ablation.sh gives it
    "base": "", "he": "--init he", "sym": "--stride-padding symmetric",
    "zero": "--zero-init-residual", "ema": "--ema-decay 0.999", "lr02": "--lr 0.2",
    "b256": "--batch-size 256", "paper": "--init he --stride-padding symmetric",
    # the first --zero-init-residual (before commit f9ec587), which also zeroed the
    # channels the option-A shortcut pads and left them dead: kept as a record
    "zero-deadchannels": "--zero-init-residual (first version, padded channels dead)",
}


def read_arm(path: pathlib.Path) -> dict:
    """seed -> (test_acc or None, best_valid_acc, wall-clock seconds, epochs done)."""
    runs = {}
    with h5py.File(path, "r") as f:
        for name, group in f.items():
            if not isinstance(group, h5py.Group) or "epoch" not in group:
                continue
            seed = int(name.rsplit("-s", 1)[1])
            test = group.attrs.get("test_acc")
            valid = group["valid_acc"][()]
            runs[seed] = (float(test) if test is not None else None,
                          float(valid.max()) if len(valid) else float("nan"),
                          float(group["seconds"][()].sum()), int(len(group["epoch"])))
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", default="checkpoints/ablation")
    p.add_argument("--files", action="store_true",
                   help="ROOT holds ablation-<arm>.h5 files instead of <arm>/histories.h5")
    p.add_argument("--write", metavar="FILE", help="replace the table between the markers of FILE")
    args = p.parse_args(argv)
    if not args.write:
        print_table(pathlib.Path(args.root), args.files)
        return
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(pathlib.Path(args.root), args.files)
    path = pathlib.Path(args.write)
    text = path.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: no single {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    tail = rest.split(END)[1]
    block = out.getvalue() + "\n" + NOTE.format(date=datetime.date.today().isoformat()) + "\n"
    path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")


def print_table(root: pathlib.Path, files: bool) -> None:
    table = {}
    for arm in ARMS:
        path = root / (f"ablation-{arm}.h5" if files else f"{arm}/histories.h5")
        if path.is_file():
            table[arm] = read_arm(path)
    base = {s: v[0] for s, v in table.get("base", {}).items() if v[0] is not None}
    print("| arm | flags | seeds finished | test % per seed | mean % | spread | vs base, same seeds | "
          "best valid % | wall-clock per run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, runs in table.items():
        done = {s: v for s, v in sorted(runs.items()) if v[0] is not None}
        open_ = {s: v for s, v in sorted(runs.items()) if v[0] is None}
        tests = [v[0] * 100 for v in done.values()]
        mean = statistics.mean(tests) if tests else None
        # paired: the mean over the seeds both finished of (arm - base), each seed with
        # the base run of the same data order, and whether every one of them is ahead
        paired = [100 * (v[0] - base[s]) for s, v in done.items() if s in base]
        vs_base = "-" if not paired else (f"{statistics.mean(paired):+.2f} "
                                          f"({sum(d > 0 for d in paired)}/{len(paired)} ahead)")
        cells = [arm, f"`{ARMS[arm]}`" if ARMS[arm] else "(fast as is)",
                 ", ".join(str(s) for s in done) or "-",
                 " / ".join(f"{t:.2f}" for t in tests) or "-",
                 f"{mean:.2f}" if mean is not None else "-",
                 f"{max(tests) - min(tests):.2f}" if len(tests) > 1 else "-",
                 vs_base,
                 " / ".join(f"{v[1] * 100:.2f}" for v in done.values()) or "-",
                 " / ".join(f"{v[2] / 60:.0f} min" for v in done.values()) or "-"]
        if open_:
            cells[2] += " (running: " + ", ".join(f"seed {s} at epoch {v[3]}"
                                                  for s, v in open_.items()) + ")"
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
