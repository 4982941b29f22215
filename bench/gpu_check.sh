#!/usr/bin/env bash
# GPU check of resnet-graph on a machine with one NVIDIA GPU (H100/H200) and TensorFlow:
#   1. nvidia-smi -L, and a clear failure when TensorFlow sees no GPU;
#   2. `resnet-graph bench original` (ResNet-32, batch 128, 20 warm-up + 100 timed steps)
#      for fp32/fp16 x NHWC/NCHW x no XLA/XLA: a markdown table of images/s;
#   3. 3-epoch trainings, fp16 and fp32, on CIFAR-10 ($RESNET_GRAPH_DATA_DIR) and each epoch's
#      validation accuracy (and the test accuracy) read back from the HDF5 history.
# Meant to finish in under 5 minutes.
#
#   RESNET_GRAPH_DATA_DIR=/path/to/cifar-10-batches-bin bash bench/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  # print each command instead of running it
# It runs from the repository root wherever it is started, so give RESNET_GRAPH_DATA_DIR as an
# absolute path (a relative one is read from the repository root).
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), RESNET_GRAPH
# (default: resnet-graph next to $PYTHON, else on PATH), RESNET_GRAPH_DATA_DIR (required: the
# folder with the CIFAR-10 binary files; no download is attempted), GPU_CHECK_OUT (folder for
# the runs; default a new temporary folder, kept and printed at the end).
set -euo pipefail

cd "$(dirname "$0")/.."
DRY="${GPU_CHECK_DRY_RUN:-}"
[[ "$DRY" == "0" ]] && DRY=""

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
if [[ -z "${RESNET_GRAPH:-}" ]]; then
  if [[ -x "$(dirname "$(command -v "$PYTHON" || echo "$PYTHON")")/resnet-graph" ]]; then
    RESNET_GRAPH="$(dirname "$(command -v "$PYTHON")")/resnet-graph"
  else
    RESNET_GRAPH=resnet-graph
  fi
fi
DATA_DIR="${RESNET_GRAPH_DATA_DIR:-}"
if [[ -z "$DATA_DIR" ]]; then
  if [[ -z "$DRY" ]]; then
    printf 'gpu_check: set RESNET_GRAPH_DATA_DIR to the folder with the CIFAR-10 binary files, e.g.\n' >&2
    printf '  RESNET_GRAPH_DATA_DIR=/path/to/cifar-10-batches-bin bash bench/gpu_check.sh\n' >&2
    exit 1
  fi
  DATA_DIR='$RESNET_GRAPH_DATA_DIR'   # a dry run only prints the commands
fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}"
mkdir -p "$OUT"
BENCH_LINES="$OUT/bench.tsv"
: > "$BENCH_LINES"
failures=0

say() { printf '\n== %s\n' "$*"; }
die() { printf 'gpu_check: %s\n' "$*" >&2; exit 1; }
# run CMD...: the command itself, or under GPU_CHECK_DRY_RUN its echo.
run() {
  if [[ -n "$DRY" ]]; then
    printf '[dry-run]'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

say "GPU"
if [[ -z "$DRY" ]] && ! command -v nvidia-smi >/dev/null; then
  die "nvidia-smi not found: this script needs a machine with an NVIDIA GPU and its driver"
fi
run nvidia-smi -L
run "$PYTHON" - <<'EOF' || die "TensorFlow sees no GPU (see the lines above); nothing to check"
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
build = tf.sysconfig.get_build_info()
print(f"TensorFlow {tf.__version__} (CUDA {build.get('cuda_version', '?')}, "
      f"cuDNN {build.get('cudnn_version', '?')}): {len(gpus)} GPU(s)")
for g in gpus:
    print("  ", g.name, tf.config.experimental.get_device_details(g).get("device_name", "?"))
sys.exit(0 if gpus else 1)
EOF

say "resnet-graph bench original, ResNet-32, batch 128, 20 warm-up + 100 timed steps"
for precision in fp32 fp16; do
  for data_format in NHWC NCHW; do
    for xla in --no-xla --xla; do
      printf '%s %s %s ... ' "$precision" "$data_format" "$xla"
      if line="$(run "$RESNET_GRAPH" bench original --depth 32 --batch-size 128 \
                   --steps 100 --warmup 20 --precision "$precision" \
                   --data-format "$data_format" "$xla" --json)"; then
        echo "$line" | tail -n 1
        printf '%s\t%s\t%s\t%s\n' "$precision" "$data_format" "$xla" \
          "$(echo "$line" | tail -n 1)" >> "$BENCH_LINES"
      else
        echo "FAILED (exit code $?)"
        printf '%s\t%s\t%s\t%s\n' "$precision" "$data_format" "$xla" "FAILED" >> "$BENCH_LINES"
        failures=$((failures + 1))
      fi
    done
  done
done

say "images/s (markdown)"
run "$PYTHON" - "$BENCH_LINES" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t", 3) for line in open(sys.argv[1]) if line.strip()]
device = next((json.loads(r[3]).get("device") for r in rows
               if r[3].startswith("{")), "unknown device")
print(f"resnet-graph bench original --depth 32 --batch-size 128 --steps 100 --warmup 20 "
      f"on {device}\n")
print("| precision | data format | XLA | images/s |")
print("| --- | --- | --- | ---: |")
for precision, data_format, xla, text in rows:
    try:
        ips = f"{json.loads(text)['images_per_sec']:.0f}"
    except (ValueError, KeyError):
        ips = "failed"
    print(f"| {precision} | {data_format} | {'yes' if xla == '--xla' else 'no'} | {ips} |")
EOF

say "3-epoch trainings on CIFAR-10 ($DATA_DIR), fp16 and fp32"
if [[ -z "$DRY" && ! -d "$DATA_DIR" ]]; then
  die "no CIFAR-10 folder at $DATA_DIR (set RESNET_GRAPH_DATA_DIR)"
fi
for precision in fp16 fp32; do
  start=$SECONDS
  run "$RESNET_GRAPH" train original --epochs 3 --precision "$precision" \
    --name "gpu-$precision" --out "$OUT" --data-dir "$DATA_DIR" --quiet
  echo "gpu-$precision: $((SECONDS - start)) s"
done

say "validation accuracy per epoch (from $OUT/histories.h5)"
run "$PYTHON" - "$OUT/histories.h5" <<'EOF'
import sys
import h5py
names = ("gpu-fp16", "gpu-fp32")
with h5py.File(sys.argv[1], "r") as f:
    runs = {n: f[n] for n in names}
    epochs = [int(e) for e in runs[names[0]]["epoch"][()]]
    acc = {n: {int(e): float(a) for e, a in zip(g["epoch"][()], g["valid_acc"][()])}
           for n, g in runs.items()}
    print("| epoch | " + " | ".join(f"{n} valid acc" for n in names) + " |")
    print("| ---: |" + " ---: |" * len(names))
    for e in sorted(set().union(*acc.values())):
        print(f"| {e} | " + " | ".join(f"{acc[n][e]:.4f}" if e in acc[n] else "-"
                                       for n in names) + " |")
    for n, g in runs.items():
        test = g.attrs.get("test_acc")
        print(f"{n}: test accuracy {float(test):.4f}" if test is not None
              else f"{n}: no test accuracy recorded")
EOF

say "done in ${SECONDS} s; runs and histories kept in $OUT"
if ((failures)); then
  die "$failures of 8 bench runs failed"
fi
