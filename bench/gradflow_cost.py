"""What recording the per-layer gradient norms (history ``grad_norm``) costs a training run.

    .venv/bin/python bench/gradflow_cost.py --data-dir DIR [--depth 56] [--train-examples 10000]
        [--epochs 2] [--repeats 2] [--json FILE]

Trains the same short run (``original``, fp32, the ``fast`` recipe cut to ``--epochs``) with
the probe off and on, alternating the order in each repeat, in this one process, and
reports per setting the training images/s and the wall-clock of the epochs (training steps,
the probe, validation); the probe's own seconds come from the history's
``grad_norm_seconds``. The cost is the ratio of epoch wall-clock with and without, and the
probe's share of its epoch (which does not depend on what else the machine runs). Numbers
are the best of the repeats (the least disturbed on a shared machine).
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile

from resnet_graph import data, history
from resnet_graph.config import make_config
from resnet_graph.train import Trainer


class NoProbe(Trainer):
    record_gradients = False


def one_run(cls, cfg, dataset, folder):
    cls(cfg, dataset, folder / "run", folder / "h.h5", log=lambda s: None,
        progress=False).run()
    run = history.read_run(folder / "h.h5", cfg.name)
    cols = run.columns
    probe = list(cols["grad_norm_seconds"]) if "grad_norm_seconds" in cols else [0.0]
    return {"images_per_sec": statistics.fmean(cols["images_per_sec"]),
            "epoch_seconds": statistics.fmean(cols["seconds"]),
            "probe_seconds": statistics.fmean(probe)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--train-examples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--valid-size", type=int, default=5000)
    p.add_argument("--json", type=pathlib.Path)
    args = p.parse_args(argv)
    cfg = make_config("original", "fast", depth=args.depth, epochs=args.epochs,
                      train_examples=args.train_examples, valid_size=args.valid_size,
                      precision="fp32")
    dataset = data.load_cifar10(args.data_dir, valid_size=cfg.valid_size,
                                train_examples=cfg.train_examples, seed=cfg.seed)
    results = {"off": [], "on": []}
    for repeat in range(args.repeats):
        order = (("off", NoProbe), ("on", Trainer)) if repeat % 2 == 0 else \
            (("on", Trainer), ("off", NoProbe))
        for label, cls in order:
            with tempfile.TemporaryDirectory() as tmp:
                results[label].append(one_run(cls, cfg, dataset, pathlib.Path(tmp)))
                print(f"repeat {repeat + 1} probe {label}: {results[label][-1]}", file=sys.stderr)
    best = {k: {"images_per_sec": max(r["images_per_sec"] for r in v),
                "epoch_seconds": min(r["epoch_seconds"] for r in v),
                "probe_seconds": min(r["probe_seconds"] for r in v)} for k, v in results.items()}
    summary = {
        "model": "original", "depth": args.depth, "train_images": len(dataset.train),
        "batch_size": cfg.batch_size, "epochs": args.epochs, "repeats": args.repeats,
        "best": best, "runs": results,
        "epoch_seconds_ratio_on_off": best["on"]["epoch_seconds"] / best["off"]["epoch_seconds"],
        "images_per_sec_ratio_on_off": best["on"]["images_per_sec"] / best["off"]["images_per_sec"],
        "probe_share_of_epoch": best["on"]["probe_seconds"] / best["on"]["epoch_seconds"],
    }
    text = json.dumps(summary, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
