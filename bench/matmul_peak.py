"""The machine's matrix-multiply ceiling in GFLOP/s, fp32 and bf16, measured with TensorFlow.

    .venv/bin/python bench/matmul_peak.py --json
    .venv/bin/python bench/matmul_peak.py --backends numpy,tensorflow,torch --sizes 2048

One n x n by n x n product counts 2 n^3 floating-point operations. For each backend,
dtype and size: one untimed call, then ``--repeats`` timed rounds of as many calls as
fill about ``--round-seconds`` (at least one); a round's time per call is its wall time
over its calls, and the best round is kept. TensorFlow runs ``reduce_sum(matmul(a, b))``
in a ``tf.function`` and fetches the scalar (so the product has finished and only a
scalar leaves the runtime); numpy runs ``np.matmul(a, b, out=c)`` (fp32 only, as a
cross-check of TensorFlow's fp32 number); PyTorch, when asked, runs ``torch.mm`` under
``torch.inference_mode`` (another cross-check, fp32 and bf16).

The ceiling of a precision is the best TensorFlow number over the sizes: it is what
resnet-graph's kernels (TensorFlow's oneDNN) reach on a large dense product, the
yardstick for the convolutions of a training step.
"""

import argparse
import json
import os
import sys
import time

from common import cpu_name

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BACKENDS = ("numpy", "tensorflow", "torch")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2048,4096", help="comma-separated n (default 2048,4096)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--backends", default="numpy,tensorflow",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default numpy,tensorflow)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the best is kept")
    p.add_argument("--round-seconds", type=float, default=0.5,
                   help="aim of one round's length (at least one call a round)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: comma-separated integers expected")
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.backends = [b for b in args.backends.split(",") if b]
    if not args.sizes or min(args.sizes) < 1:
        p.error("--sizes: positive integers expected")
    if not set(args.dtypes) <= {"fp32", "bf16"} or not args.dtypes:
        p.error(f"--dtypes {','.join(args.dtypes)}: fp32 and/or bf16 expected")
    if not set(args.backends) <= set(BACKENDS) or not args.backends:
        p.error(f"--backends {','.join(args.backends)}: choose from {', '.join(BACKENDS)}")
    if args.repeats < 1 or args.round_seconds <= 0:
        p.error("--repeats and --round-seconds must be positive")
    return args


def best_seconds_per_call(call, repeats, round_seconds):
    """Run ``call`` once untimed, then ``repeats`` rounds; the best time per call."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    per_round = max(1, int(round_seconds / max(first, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_round):
            call()
        best = min(best, (time.perf_counter() - start) / per_round)
    return best, per_round


def numpy_blas():
    import numpy as np
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        return "unknown"


def numpy_call(n, dtype):
    import numpy as np
    if dtype != "fp32":
        return None, "numpy has no bf16 matmul"
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    return (lambda: np.matmul(a, b, out=c)), None


def tensorflow_call(n, dtype):
    import tensorflow as tf
    tf_dtype = {"fp32": tf.float32, "bf16": tf.bfloat16}[dtype]
    a, b = (tf.cast(tf.random.stateless_normal((n, n), seed=(0, i)), tf_dtype) for i in (1, 2))

    @tf.function
    def product_sum(x, y):
        return tf.reduce_sum(tf.cast(tf.linalg.matmul(x, y), tf.float32))

    return (lambda: product_sum(a, b).numpy()), None


def torch_call(n, dtype):
    import torch
    torch.set_num_threads(os.cpu_count())
    t_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(t_dtype) for _ in range(2))
    c = torch.empty(n, n, dtype=t_dtype)

    def call():
        with torch.inference_mode():
            torch.mm(a, b, out=c)
    return call, None


def versions(backend):
    if backend == "numpy":
        import numpy as np
        return f"numpy {np.__version__} ({numpy_blas()})"
    if backend == "tensorflow":
        import tensorflow as tf
        return f"tensorflow {tf.__version__}"
    import torch
    return f"torch {torch.__version__}"


def main(argv=None):
    args = parse_args(argv)
    makers = {"numpy": numpy_call, "tensorflow": tensorflow_call, "torch": torch_call}
    rows = []
    # numpy first: before TensorFlow or PyTorch start their thread pools.
    for backend in sorted(args.backends, key=BACKENDS.index):
        try:
            version = versions(backend)
        except ImportError as e:
            rows.append({"backend": backend, "error": f"cannot import: {e}"})
            continue
        for dtype in args.dtypes:
            for n in args.sizes:
                row = {"backend": backend, "version": version, "dtype": dtype, "n": n,
                       "flops_per_call": 2 * n ** 3}
                try:
                    call, why_not = makers[backend](n, dtype)
                    if call is None:
                        continue
                    seconds, per_round = best_seconds_per_call(call, args.repeats,
                                                               args.round_seconds)
                    row.update(best_seconds=seconds, calls_per_round=per_round,
                               repeats=args.repeats, gflops=2 * n ** 3 / seconds / 1e9)
                except Exception as e:  # e.g. a dtype the build has no kernel for
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                rows.append(row)
    ceilings = {}
    for dtype in args.dtypes:
        measured = [r for r in rows if r["backend"] == "tensorflow" and r.get("dtype") == dtype
                    and "gflops" in r]
        if measured:
            best = max(measured, key=lambda r: r["gflops"])
            ceilings[dtype] = {"gflops": best["gflops"], "backend": "tensorflow", "n": best["n"]}
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "results": rows, "ceilings": ceilings,
              "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                          "OMP_NUM_THREADS") if k in os.environ}}
    if args.json:
        print(json.dumps(result))
    else:
        for r in rows:
            if "gflops" in r:
                print(f"{r['backend']:<11}{r['dtype']:<6}n={r['n']:<6}{r['gflops']:10.1f} GFLOP/s"
                      f"  ({r['best_seconds'] * 1e3:.1f} ms a call, best of {r['repeats']})")
            else:
                print(f"{r['backend']:<11}{r.get('dtype', ''):<6}n={r.get('n', '')!s:<6}"
                      f"  failed: {r['error']}")
        for dtype, c in ceilings.items():
            print(f"ceiling {dtype}: {c['gflops']:.1f} GFLOP/s (tensorflow, n={c['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
