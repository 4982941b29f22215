"""oneDNN on vs off: resnet-graph's training speed with each, and PyTorch's beside them.

    .venv/bin/python bench/onednn.py [--models original,preact,plain] [--repeats 2] [--json F]

For each model, ``resnet-graph bench MODEL --precision P --json`` runs in a subprocess
with ``TF_ENABLE_ONEDNN_OPTS=1`` and with ``=0`` (TensorFlow reads the variable once, at
import, so each setting needs its own process), alternating the order in every repeat;
``bench/torch_ref.py`` (the same ResNet-32 "original" in PyTorch eager, if torch imports)
runs in the same rounds. A number is the best of its repeats (least disturbed by other
work on a shared machine); the table gives images/s and the ratios measured in this run.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
EXE = pathlib.Path(sys.executable).with_name("resnet-graph")


def graph_speed(model, precision, onednn, steps, depth):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1" if onednn else "0")
    out = subprocess.run([str(EXE), "bench", model, "--depth", str(depth), "--precision",
                          precision, "--steps", str(steps), "--json"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["images_per_sec"]


def torch_speed(precision, steps, depth):
    out = subprocess.run([sys.executable, str(HERE / "torch_ref.py"), "--depth", str(depth),
                          "--precision", precision, "--steps", str(steps), "--json"],
                         capture_output=True, text=True)
    if out.returncode:
        return None
    return json.loads(out.stdout)["images_per_sec"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="original,preact,plain")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the measurements to this file")
    args = p.parse_args(argv)
    models = args.models.split(",")
    runs = {}
    for r in range(args.repeats):
        settings = (True, False) if r % 2 == 0 else (False, True)
        for model in models:
            for onednn in settings:
                key = f"{model} onednn={'on' if onednn else 'off'}"
                runs.setdefault(key, []).append(
                    graph_speed(model, args.precision, onednn, args.steps, args.depth))
                print(key, runs[key][-1], file=sys.stderr, flush=True)
        speed = torch_speed(args.precision, args.steps, args.depth)
        if speed is not None:
            runs.setdefault("torch", []).append(speed)
            print("torch", speed, file=sys.stderr, flush=True)
    best = {k: max(v) for k, v in runs.items()}
    torch = best.get("torch")
    print(f"| model ({args.precision}, depth {args.depth}) | oneDNN off img/s | oneDNN on img/s "
          f"| on / off |" + (" off / PyTorch | on / PyTorch |" if torch else ""))
    print("| --- | --- | --- | --- |" + (" --- | --- |" if torch else ""))
    for model in models:
        on, off = best[f"{model} onednn=on"], best[f"{model} onednn=off"]
        row = f"| {model} | {off:.1f} | {on:.1f} | {on / off:.2f}x |"
        if torch and model == "original":
            row += f" {off / torch:.2f}x | {on / torch:.2f}x |"
        elif torch:
            row += " | |"
        print(row)
    if torch:
        print(f"\nPyTorch eager (bench/torch_ref.py, original): {torch:.1f} img/s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"runs": runs, "best": best}, indent=2))


if __name__ == "__main__":
    main()
