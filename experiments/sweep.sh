#!/usr/bin/env bash
# The issue-25 depth sweep (docs/results.md, "The degradation problem"): `plain` and
# `original` at depths 20, 32, 44 and 56, seed 0, the `fast` recipe cut to 10 epochs, fp32,
# on the shared CIFAR-10; then `responses` on every finished run, and the report again (it
# draws responses.png once the runs have their responses.json).
#
#   cd <worktree> && setsid nohup bash experiments/sweep.sh >> "$SWEEP_DIR/run.log" 2>&1 < /dev/null &
#
# Resumable: run it again and `experiment` keeps the finished runs and resumes the
# unfinished one from its checkpoint; a run that has its responses.json is not measured
# again. Across machines: CARRY names a snapshot made by
#   .venv/bin/python experiments/carry.py save --lean "$SWEEP_DIR" docs/runs/sweep
# which carries the unfinished runs' checkpoints (committed for this sweep), and is restored
# into $SWEEP_DIR first. The code is the editable install of $REPO (default: the current
# folder): do not edit that folder while it runs (use a worktree of a fixed commit).
set -u

REPO=${REPO:-$(pwd)}
SWEEP_DIR=${SWEEP_DIR:-/work/sweep/exp}
DATA_DIR=${DATA_DIR:-/work/shared/data/cifar-10-batches-bin}
EPOCHS=${EPOCHS:-10}
DEPTHS=${DEPTHS:-20,32,44,56}
MODELS=${MODELS:-plain,original}
CARRY=${CARRY:-}
EXE="$REPO/.venv/bin/resnet-graph"

if [ ! -x "$EXE" ]; then
    echo "no $EXE: run this from a checkout with 'make install' done (or set REPO)" >&2
    exit 1
fi
mkdir -p "$SWEEP_DIR"
if [ -n "$CARRY" ]; then
    "$REPO/.venv/bin/python" "$REPO/experiments/carry.py" restore "$CARRY" "$SWEEP_DIR" || exit 1
fi
echo "$(date -u '+%F %T') sweep in $SWEEP_DIR from $REPO at $(git -C "$REPO" rev-parse --short HEAD)"
experiment=("$EXE" experiment --recipe fast --models "$MODELS" --depths "$DEPTHS" --seeds 0
            --epochs "$EPOCHS" --precision fp32 --data-dir "$DATA_DIR" --out "$SWEEP_DIR")
"${experiment[@]}"
status=$?
if [ "$status" -ne 0 ]; then
    echo "$(date -u '+%F %T') experiment stopped with status $status (run this again to resume)"
    exit "$status"
fi
for run in "$SWEEP_DIR"/*-s0; do
    if [ -f "$run/config.json" ] && [ ! -f "$run/responses.json" ]; then
        "$EXE" responses --ckpt "$run" --data-dir "$DATA_DIR" > /dev/null || exit 1
        echo "$(date -u '+%F %T') responses of $(basename "$run")"
    fi
done
# Every run is finished now: the same command only writes the report (with responses.png).
"${experiment[@]}" --quiet
echo "$(date -u '+%F %T') sweep done: $SWEEP_DIR/report.md"
