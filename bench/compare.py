"""Compare resnet-graph's training speed with Keras 3 and PyTorch on this machine.

    .venv/bin/python bench/compare.py                          # print the tables
    .venv/bin/python bench/compare.py --out docs/performance.md --json /tmp/compare.json

Every contender trains the same ResNet-32 (original, option A, 464,154 parameters) on
random in-memory CIFAR-sized data, batch 100, Adam, and reports images/s of timed
training steps after a warm-up. Each runs in its own subprocess, one after the other,
so that no two compete for the cores:

- resnet-graph fp32 and bf16: ``resnet-graph bench original --json`` (the console
  script next to this interpreter);
- Keras 3 ``model.fit`` fp32 and mixed_bfloat16: ``bench/keras_ref.py``;
- PyTorch eager fp32 and bf16 autocast: ``bench/torch_ref.py`` (rows skipped, with a
  note, when ``import torch`` fails);
- the matrix-multiply ceilings: ``bench/matmul_peak.py`` (TensorFlow fp32 and bf16,
  numpy fp32 and PyTorch as cross-checks).

The whole round runs ``--repeats`` times, alternating its order (forward, backward,
forward, ...); a contender's number is the best of its runs (``--stat best``, the
default: least disturbed by other work on the machine) or their median
(``--stat median``); a ceiling is always the best. ``--out FILE`` writes the report
between ``<!-- compare:begin -->`` and ``<!-- compare:end -->`` in FILE (the text
between existing markers is replaced; else the section is appended; the file is
created if missing). Only numbers measured in this run are written.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
DEPTH = 32
EXPECTED_PARAMS = 464_154
STAGE_FILTERS = (16, 32, 64)
FRAMEWORKS = {"graph": "resnet-graph", "keras": "Keras 3 fit", "torch": "PyTorch eager"}


# --------------------------------------------------------------------------- FLOPs

def layer_macs(depth=DEPTH, image=32, classes=10):
    """Multiply-accumulates per image of every conv and the dense layer, in order."""
    n = (depth - 2) // 6
    layers = [("stem conv 3x3, 3->16", image * image * 9 * 3 * STAGE_FILTERS[0])]
    size, cin = image, STAGE_FILTERS[0]
    for stage, cout in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, n + 1):
            stride = 2 if (stage > 1 and block == 1) else 1
            size //= stride
            layers.append((f"stage{stage} block{block} conv1 3x3/{stride}, {cin}->{cout}",
                           size * size * 9 * cin * cout))
            layers.append((f"stage{stage} block{block} conv2 3x3, {cout}->{cout}",
                           size * size * 9 * cout * cout))
            cin = cout
    layers.append((f"dense {cin}->{classes}", cin * classes))
    return layers


def training_flops_per_image(depth=DEPTH):
    macs = sum(m for _, m in layer_macs(depth))
    forward = 2 * macs
    return {"macs": macs, "forward_flops": forward, "training_flops": 3 * forward}


def flops_formula(f):
    stem = layer_macs()[0][1]
    return (
        "forward FLOPs/image = 2 x sum over the 31 convs and the dense layer of "
        "(H_out x W_out x k^2 x C_in x C_out), dense 64 x 10\n"
        f"  = 2 x {f['macs']:,} MAC = {f['forward_flops']:,} FLOP "
        f"({f['forward_flops'] / 1e9:.4f} GFLOP)\n"
        "training FLOPs/image = 3 x forward (forward, gradient w.r.t. inputs, gradient "
        "w.r.t. weights)\n"
        f"  = {f['training_flops']:,} FLOP ({f['training_flops'] / 1e9:.4f} GFLOP)\n"
        "  not counted: batch norm, ReLU, additions, pooling, bias, softmax, Adam's update "
        "(elementwise work);\n"
        f"  counted though never computed: the stem's input gradient (2 x {stem:,} FLOP)")


# --------------------------------------------------------------------------- machine

def cpu_info():
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == (platform.processor() or platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return name, [f for f in wanted if f in flags]


def memory_gib():
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2 ** 20
    except (OSError, ValueError, IndexError):
        pass
    return None


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return None


# --------------------------------------------------------------------------- running

def resnet_graph_command():
    script = pathlib.Path(sys.executable).parent / "resnet-graph"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "resnet_graph.cli"]


def torch_status():
    """(True, version) when ``import torch`` works in this interpreter, else (False, why)."""
    p = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                       capture_output=True, text=True)
    if p.returncode == 0:
        return True, p.stdout.strip()
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    return False, lines[-1] if lines else f"exit code {p.returncode}"


def contenders(args, torch_ok):
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    rows = []
    for framework in args.only:
        if framework == "matmul":
            continue
        for precision in args.precisions:
            if framework == "graph":
                argv = resnet_graph_command() + [
                    "bench", "original", "--depth", str(DEPTH), "--optimizer", "adam",
                    "--precision", precision, "--data-format", "NHWC", "--no-xla",
                    "--json"] + common
            elif framework == "keras":
                argv = [sys.executable, str(HERE / "keras_ref.py"), "--precision", precision,
                        "--json"] + common
            else:
                if not torch_ok:
                    continue
                argv = [sys.executable, str(HERE / "torch_ref.py"), "--precision", precision,
                        "--json"] + common
            rows.append({"key": f"{framework}-{precision}", "framework": framework,
                         "precision": precision, "argv": argv})
    if "matmul" in args.only:
        argv = [sys.executable, str(HERE / "matmul_peak.py"), "--json", "--dtypes",
                ",".join(args.precisions), "--sizes", args.matmul_sizes,
                "--backends", "numpy,tensorflow" + (",torch" if torch_ok else "")]
        rows.append({"key": "matmul", "framework": "matmul", "precision": None, "argv": argv})
    return rows


def run_json(argv, timeout):
    """Run ``argv``; return (the last JSON object line of its stdout, None) or (None, error)."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    except OSError as e:
        return None, f"could not start: {e}"
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                break
            if p.returncode == 0:
                return result, None
            break
    tail = [line for line in (p.stderr + p.stdout).strip().splitlines() if line.strip()][-3:]
    return None, f"exit code {p.returncode}: " + " | ".join(tail)


# --------------------------------------------------------------------------- report

def fmt(x, spec=".1f", none="n/a"):
    return none if x is None else format(x, spec)


def summarise(runs, stat, flops):
    """Per contender: its runs, the chosen statistic, GFLOP/s; the ceilings."""
    summary = {"contenders": {}, "ceilings": {}, "matmul": {}}
    for key, entries in runs.items():
        if key == "matmul":
            continue
        ok = [e["result"]["images_per_sec"] for e in entries if e["result"]]
        value = None
        if ok:
            value = max(ok) if stat == "best" else statistics.median(ok)
        first = entries[0]
        summary["contenders"][key] = {
            "framework": first["framework"], "precision": first["precision"],
            "runs": ok, "errors": [e["error"] for e in entries if e["error"]],
            "images_per_sec": value,
            "gflops": None if value is None else value * flops / 1e9,
            "details": next((e["result"] for e in entries if e["result"]), None)}
    for entry in runs.get("matmul", []):
        if not entry["result"]:
            continue
        for r in entry["result"]["results"]:
            if "gflops" not in r:
                continue
            k = (r["backend"], r["dtype"])
            best = summary["matmul"].get(k)
            if best is None or r["gflops"] > best["gflops"]:
                summary["matmul"][k] = {"gflops": r["gflops"], "n": r["n"],
                                        "version": r["version"]}
    for (backend, dtype), m in summary["matmul"].items():
        if backend == "tensorflow":
            summary["ceilings"][dtype] = m
    return summary


def tables(summary, args, flops):
    """Markdown tables: the contenders, peer ratios, bf16 speed-ups, matmul ceilings."""
    c, ceil, mm = summary["contenders"], summary["ceilings"], summary["matmul"]
    stat_word = (f"best of {args.repeats}" if args.stat == "best"
                 else f"median of {args.repeats}")
    out = []
    if not c:
        out.append("(no training contender ran)")
    else:
        out.append(f"| contender | precision | img/s ({stat_word}) | runs (img/s) "
                   f"| vs resnet-graph same precision | achieved GFLOP/s "
                   f"| % of TF matmul ceiling | % of best matmul, any backend |")
        out.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for key, row in c.items():
        ips = row["images_per_sec"]
        base = c.get(f"graph-{row['precision']}", {}).get("images_per_sec")
        ceiling = ceil.get(row["precision"], {}).get("gflops")
        best_any = max((m["gflops"] for (b, d), m in mm.items() if d == row["precision"]),
                       default=None)
        runs = ", ".join(f"{x:.1f}" for x in row["runs"]) or "failed"

        def pct(top, ips=ips, row=row):
            return None if (ips is None or not top) else 100 * row["gflops"] / top
        out.append(f"| {FRAMEWORKS[row['framework']]} | {row['precision']} | {fmt(ips)} | {runs} "
                   f"| {fmt(None if ips is None or not base else ips / base, '.2f')} "
                   f"| {fmt(row['gflops'])} | {fmt(pct(ceiling))} | {fmt(pct(best_any))} |")
    # Ratios between peers, per precision: row / column.
    for precision in args.precisions:
        present = [(f, c[f"{f}-{precision}"]["images_per_sec"]) for f in FRAMEWORKS
                   if f"{f}-{precision}" in c and c[f"{f}-{precision}"]["images_per_sec"]]
        if len(present) < 2:
            continue
        out.append("")
        out.append(f"{precision}: speed ratio, row / column (above 1: the row is faster)")
        out.append("")
        out.append("| | " + " | ".join(FRAMEWORKS[f] for f, _ in present) + " |")
        out.append("| --- |" + " ---: |" * len(present))
        for f, v in present:
            out.append(f"| {FRAMEWORKS[f]} | " + " | ".join(f"{v / w:.2f}" for _, w in present)
                       + " |")
    speedups = []
    for f in FRAMEWORKS:
        a, b = c.get(f"{f}-fp32", {}).get("images_per_sec"), c.get(f"{f}-bf16", {}).get(
            "images_per_sec")
        if a and b:
            speedups.append(f"{FRAMEWORKS[f]} {b / a:.2f}x")
    if speedups:
        out.append("")
        out.append("bf16 over fp32, same framework: " + ", ".join(speedups) + ".")
    if mm:
        out.append("")
        out.append(f"Matrix-multiply ceilings (n x n by n x n, 2n^3 FLOP a product, best call "
                   f"over the rounds; sizes {args.matmul_sizes}):")
        out.append("")
        out.append("| backend | dtype | GFLOP/s | best at n | role |")
        out.append("| --- | --- | ---: | ---: | --- |")
        order = sorted(mm.items(), key=lambda kv: (kv[0][1] != "fp32", kv[0][0] != "tensorflow",
                                                   kv[0][0]))
        for (backend, dtype), m in order:
            role = "ceiling" if backend == "tensorflow" else "cross-check"
            out.append(f"| {m['version']} | {dtype} | {m['gflops']:.1f} | {m['n']} | {role} |")
    return "\n".join(out)


def machine_lines(torch_version):
    name, flags = cpu_info()
    mem = memory_gib()
    versions = [f"TensorFlow {version('tensorflow') or 'not installed'}",
                f"Keras {version('keras') or 'not installed'}",
                f"PyTorch {torch_version}",
                f"numpy {version('numpy') or 'not installed'}"]
    return [f"CPU: {name} ({', '.join(flags) or 'no AVX-512/AMX flags'}), "
            f"{os.cpu_count()} cores, {fmt(mem, '.1f')} GiB memory; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
            "Software: " + ", ".join(versions)]


def section(summary, args, flops, meta):
    c = summary["contenders"]
    lines = [BEGIN, "## CPU comparison with Keras 3 and PyTorch (bench/compare.py)", ""]
    lines.append(f"Measured on {meta['date']} with `{meta['command']}` (run from "
                 f"`{meta['cwd']}`); each contender in its own subprocess, one after the "
                 f"other, {args.repeats} round{'s' * (args.repeats > 1)}"
                 f"{', alternating order' if args.repeats > 1 else ''}.")
    lines.append("")
    lines += [f"- {line}" for line in machine_lines(meta["torch"])]
    lines.append(f"- Load average (1, 5, 15 min) before: {meta['load_before']}, after: "
                 f"{meta['load_after']} (other work on the machine slows every number; "
                 f"PyTorch's OpenMP threads suffer most when a core is busy)")
    lines.append(f"- Each contender: ResNet-32 original, option A, {EXPECTED_PARAMS:,} "
                 f"parameters, batch {args.batch_size}, Adam, random in-memory data, "
                 f"{args.warmup} warm-up step{'s' * (args.warmup > 1)} then {args.steps} timed "
                 f"step{'s' * (args.steps > 1)} "
                 f"(forward, backward, update); NHWC everywhere, no XLA.")
    lines.append("  resnet-graph: `resnet-graph bench` (uint8 images in the graph, normalised "
                 "in the step); Keras: `model.fit` on a tf.data pipeline of float32 tensors, "
                 "a callback stamping batch ends; PyTorch: eager loop, "
                 + (f"channels_last, {c['torch-fp32']['details'].get('threads')} threads, "
                    if c.get("torch-fp32", {}).get("details") else "")
                 + "bf16 = `torch.autocast`.")
    for note in meta["notes"]:
        lines.append(f"- {note}")
    lines.append("")
    lines.append(tables(summary, args, flops))
    lines.append("")
    lines.append("Achieved GFLOP/s = img/s x training FLOPs per image, computed from the "
                 "architecture:")
    lines.append("")
    lines.append("```")
    lines.append(flops_formula(flops))
    lines.append("```")
    lines.append(END)
    return "\n".join(lines)


def write_section(path, text):
    path = pathlib.Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    start, end = old.find(BEGIN), old.find(END)
    if start != -1 and end > start:
        new = old[:start] + text + old[end + len(END):]
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + \
            ("\n" if old else "") + text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--steps", type=int, default=60, help="timed steps per contender (60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of all contenders (2)")
    p.add_argument("--stat", choices=("best", "median"), default="best",
                   help="per contender, over the rounds (best)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated (fp32,bf16)")
    p.add_argument("--only", default="graph,keras,torch,matmul",
                   help="comma-separated subset of graph, keras, torch, matmul")
    p.add_argument("--matmul-sizes", default="2048,4096", help="n of the ceiling products")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--out", metavar="FILE",
                   help="markdown file to write the section into (e.g. docs/performance.md)")
    p.add_argument("--json", metavar="FILE", dest="json_out", help="raw results as JSON")
    args = p.parse_args(argv)
    args.precisions = [x for x in args.precisions.split(",") if x]
    args.only = [x for x in args.only.split(",") if x]
    if not args.precisions or not set(args.precisions) <= {"fp32", "bf16"}:
        p.error("--precisions: fp32 and/or bf16")
    if not args.only or not set(args.only) <= {"graph", "keras", "torch", "matmul"}:
        p.error("--only: a subset of graph, keras, torch, matmul")
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1 or args.batch_size < 1:
        p.error("--steps, --warmup, --repeats and --batch-size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    flops = training_flops_per_image()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join([os.path.relpath(sys.executable)
                                   if sys.executable.startswith(os.getcwd()) else sys.executable]
                                  + sys.argv),
            "cwd": os.getcwd(), "notes": []}
    print(flops_formula(flops), flush=True)
    print()
    torch_ok, torch_info = torch_status() if "torch" in args.only else (False, "not asked")
    meta["torch"] = torch_info if torch_ok else f"not used ({torch_info})"
    if "torch" in args.only and not torch_ok:
        meta["notes"].append(f"PyTorch rows skipped: `import torch` failed ({torch_info}).")
        print(f"note: PyTorch rows skipped: import torch failed: {torch_info}", flush=True)
    load = load_average()
    meta["load_before"] = fmt(load, "") if load is None else ", ".join(f"{x:.2f}" for x in load)
    if load and load[0] > 0.5:
        print(f"warning: load average {load[0]:.2f}: other work is running; numbers will be "
              "low and noisy", flush=True)

    plan = contenders(args, torch_ok)
    runs = {row["key"]: [] for row in plan}
    for round_index in range(args.repeats):
        order = plan if round_index % 2 == 0 else plan[::-1]
        for row in order:
            label = ("matmul ceilings" if row["key"] == "matmul"
                     else f"{FRAMEWORKS[row['framework']]} {row['precision']}")
            print(f"[round {round_index + 1}/{args.repeats}] {label} ...", end=" ", flush=True)
            start = time.perf_counter()
            result, error = run_json(row["argv"], args.timeout)
            took = time.perf_counter() - start
            if result and row["key"] != "matmul" and row["framework"] != "graph" \
                    and result.get("params") != EXPECTED_PARAMS:
                result, error = None, f"parameter count {result.get('params')}, " \
                                      f"expected {EXPECTED_PARAMS}"
            runs[row["key"]].append({"framework": row["framework"], "precision": row["precision"],
                                     "argv": row["argv"], "seconds": took,
                                     "result": result, "error": error})
            if error:
                print(f"FAILED ({took:.0f} s): {error}", flush=True)
            elif row["key"] == "matmul":
                print(", ".join(f"{k} {v['gflops']:.0f} GFLOP/s"
                                for k, v in result["ceilings"].items()) + f" ({took:.0f} s)",
                      flush=True)
            else:
                print(f"{result['images_per_sec']:.1f} img/s ({took:.0f} s)", flush=True)
    load = load_average()
    meta["load_after"] = fmt(load, "") if load is None else ", ".join(f"{x:.2f}" for x in load)

    summary = summarise(runs, args.stat, flops["training_flops"])
    failed = [f"{k}: {e}" for k, v in summary["contenders"].items() for e in v["errors"]]
    failed += [f"matmul: {e['error']}" for e in runs.get("matmul", []) if e["error"]]
    for f in failed:
        meta["notes"].append(f"failed run, left out: {f}")
    print()
    print(f"per contender: the {args.stat} of {args.repeats} run(s); ceilings: the best")
    print(tables(summary, args, flops))
    for note in meta["notes"]:
        print(f"note: {note}")

    if args.json_out:
        raw = {"meta": meta, "args": {k: v for k, v in vars(args).items()},
               "flops_per_image": flops, "runs": runs,
               "summary": {"contenders": summary["contenders"],
                           "ceilings": summary["ceilings"],
                           "matmul": [{"backend": b, "dtype": d, **m}
                                      for (b, d), m in summary["matmul"].items()]}}
        pathlib.Path(args.json_out).write_text(json.dumps(raw, indent=2) + "\n")
        print(f"raw results: {args.json_out}")
    if args.out:
        write_section(args.out, section(summary, args, flops, meta))
        print(f"section written: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
