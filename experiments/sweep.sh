#!/usr/bin/env bash
# The issue-25 depth sweep (docs/results.md, "The degradation problem"): `plain` and
# `original` at depths 20, 32, 44 and 56, seed 0, the `fast` recipe cut to 10 epochs, fp32,
# on CIFAR-10 ($DATA_DIR, else what resnet-graph finds); then `responses` on every finished run, and the report again (it
# draws responses.png once the runs have their responses.json).
#
#   cd <worktree> && export SWEEP_DIR=${SWEEP_DIR:-$PWD/checkpoints/sweep} && mkdir -p "$SWEEP_DIR" &&
#       setsid nohup bash experiments/sweep.sh >> "$SWEEP_DIR/run.log" 2>&1 < /dev/null &
#
# Resumable: run it again and `experiment` keeps the finished runs and resumes the
# unfinished one from its checkpoint; a run that has its responses.json is not measured
# again. Across machines: CARRY names a snapshot made by
#   .venv/bin/python experiments/carry.py save --lean "$SWEEP_DIR" docs/runs/sweep
# which carries the unfinished runs' checkpoints (committed for this sweep), and is restored
# into $SWEEP_DIR first. The runs train with the editable install of $REPO (default: the
# current folder): do not edit that folder while it runs (use a worktree of a fixed commit;
# the runs of docs/runs/sweep trained at commit 2d6e5c0, so to finish that sweep with the
# same code: `git worktree add /work/sweep-src 2d6e5c0 && make -C /work/sweep-src install`,
# then REPO=/work/sweep-src). Restoring the snapshot, `responses` and the final report use
# this script's own checkout ($TOOLS), which needs `make install` too.
set -u

REPO=${REPO:-$(pwd)}
TOOLS=$(cd "$(dirname "$0")/.." && pwd)
SWEEP_DIR=${SWEEP_DIR:-$TOOLS/checkpoints/sweep}
# The data: $DATA_DIR when set, else what resnet-graph finds itself ($RESNET_GRAPH_DATA_DIR,
# else the user cache, downloaded there if missing).
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data-dir "$DATA_DIR"); fi
EPOCHS=${EPOCHS:-10}
DEPTHS=${DEPTHS:-20,32,44,56}
MODELS=${MODELS:-plain,original}
CARRY=${CARRY:-}
EXE="$REPO/.venv/bin/resnet-graph"

for exe in "$EXE" "$TOOLS/.venv/bin/resnet-graph"; do
    if [ ! -x "$exe" ]; then
        echo "no $exe: run 'make install' in its checkout (or set REPO)" >&2
        exit 1
    fi
done
mkdir -p "$SWEEP_DIR"
if [ -n "$CARRY" ]; then
    "$TOOLS/.venv/bin/python" "$TOOLS/experiments/carry.py" restore "$CARRY" "$SWEEP_DIR" || exit 1
fi
echo "$(date -u '+%F %T') sweep in $SWEEP_DIR, trained by $REPO at $(git -C "$REPO" rev-parse --short HEAD), tools of $TOOLS"
experiment=("$EXE" experiment --recipe fast --models "$MODELS" --depths "$DEPTHS" --seeds 0
            --epochs "$EPOCHS" --precision fp32 ${DATA[@]+"${DATA[@]}"} --out "$SWEEP_DIR")
"${experiment[@]}"
status=$?
if [ "$status" -ne 0 ]; then
    echo "$(date -u '+%F %T') experiment stopped with status $status (run this again to resume)"
    exit "$status"
fi
for run in "$SWEEP_DIR"/*-s0; do
    if [ -f "$run/config.json" ] && [ ! -f "$run/responses.json" ]; then
        "$TOOLS/.venv/bin/resnet-graph" responses --ckpt "$run" ${DATA[@]+"${DATA[@]}"} > /dev/null || exit 1
        echo "$(date -u '+%F %T') responses of $(basename "$run")"
    fi
done
# Every run is finished now: the same command only writes the report (with responses.png).
"$TOOLS/.venv/bin/resnet-graph" "${experiment[@]:1}" --quiet
echo "$(date -u '+%F %T') sweep done: $SWEEP_DIR/report.md"
