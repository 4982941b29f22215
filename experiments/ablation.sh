#!/usr/bin/env bash
# The issue-17 ablation: ResNet-20 (original), recipe fast cut to 15 epochs, bf16,
# one change from the base per arm, seeds 0 and 1.
#
#   cd <worktree> && export ABLATION_DIR=${ABLATION_DIR:-$PWD/checkpoints/ablation} && mkdir -p "$ABLATION_DIR" &&
#       setsid nohup bash experiments/ablation.sh > "$ABLATION_DIR/run.log" 2>&1 < /dev/null &
#
# Order: seed 0 of every arm (base he sym zero ema lr02 b256 paper), then seed 1 of
# every arm, so that a stop leaves balanced partial results. Each arm is one
# `resnet-graph experiment` folder $ABLATION_DIR/<arm>/ (run original-20-s<seed>,
# histories.h5, report.md/json). Resumable: run it again and `experiment` keeps the
# finished runs and resumes an unfinished one from its checkpoint. A last pass per
# arm with --seeds 0,1 writes the report of both seeds, and summary.md compares arms.
#
# Stop it with `kill -- -<pgid>` (the whole process group: the training process
# then writes a checkpoint after its current step). The code is the editable install
# of the folder it is started from ($REPO, default: the current folder): do not edit
# that folder while it runs.
set -u

REPO=${REPO:-$(pwd)}
ABLATION_DIR=${ABLATION_DIR:-$REPO/checkpoints/ablation}
# The data: $DATA_DIR when set, else what resnet-graph finds itself ($RESNET_GRAPH_DATA_DIR,
# else the user cache, downloaded there if missing).
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data-dir "$DATA_DIR"); fi
EPOCHS=${EPOCHS:-15}
SEEDS=${SEEDS:-"0 1"}
ARMS=${ARMS:-"base he sym zero ema lr02 b256 paper"}
EXE="$REPO/.venv/bin/resnet-graph"

if [ ! -x "$EXE" ]; then
    echo "no $EXE: run this from a checkout with 'make install' done (or set REPO)" >&2
    exit 1
fi
mkdir -p "$ABLATION_DIR/logs"

# One change from the base (recipe fast as it is) per arm.
arm_flags() {
    case "$1" in
        base)  echo "" ;;
        he)    echo "--init he" ;;
        sym)   echo "--stride-padding symmetric" ;;
        zero)  echo "--zero-init-residual" ;;
        ema)   echo "--ema-decay 0.999" ;;
        lr02)  echo "--lr 0.2" ;;
        b256)  echo "--batch-size 256" ;;
        paper) echo "--init he --stride-padding symmetric" ;;
        *)     echo "unknown arm $1" >&2; return 1 ;;
    esac
}

run_arm() {   # arm, seeds (comma-separated)
    local arm=$1 seeds=$2 flags status
    flags=$(arm_flags "$arm") || return 1
    # shellcheck disable=SC2086  # flags are words
    set -- "$EXE" experiment --recipe fast --models original --depth 20 --epochs "$EPOCHS" \
        --precision bf16 ${DATA[@]+"${DATA[@]}"} --seeds "$seeds" --out "$ABLATION_DIR/$arm" $flags
    echo "$(date -u '+%F %T') [$arm seeds $seeds] $*"
    "$@" 2>&1 | tee -a "$ABLATION_DIR/logs/$arm-s${seeds//,/_}.log"
    status=${PIPESTATUS[0]}
    echo "$(date -u '+%F %T') [$arm seeds $seeds] exit $status"
    return "$status"
}

echo "$(date -u '+%F %T') ablation in $ABLATION_DIR from $REPO at" \
     "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" \
     "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(uncommitted changes!)')"
for seed in $SEEDS; do
    for arm in $ARMS; do
        run_arm "$arm" "$seed"
        status=$?
        if [ "$status" -ge 128 ]; then   # stopped by a signal: stop here, resumable
            echo "stopped (exit $status); run this script again to continue"
            exit "$status"
        fi
    done
done

# Reports over both seeds (every run is finished by now, so nothing trains).
all_seeds=$(echo "$SEEDS" | tr ' ' ',')
for arm in $ARMS; do
    run_arm "$arm" "$all_seeds" > /dev/null || echo "report of $arm failed"
done

"$REPO/.venv/bin/python" - "$ABLATION_DIR" $ARMS <<'EOF'
import json, math, pathlib, sys
root, arms = pathlib.Path(sys.argv[1]), sys.argv[2:]
lines = ["| arm | runs | test (final) % | per seed | best valid % | wall-clock min |",
         "| --- | --- | --- | --- | --- | --- |"]
for arm in arms:
    try:
        report = json.loads((root / arm / "report.json").read_text())
    except OSError:
        lines.append(f"| {arm} | - | - | - | - | - |")
        continue
    runs = [r for r in report["runs"] if r["status"] == "finished"]
    tests = [100 * r["test_acc"] for r in runs]
    mean = sum(tests) / len(tests) if tests else math.nan
    valid = [100 * r["best_valid_acc"] for r in runs if r["best_valid_acc"] is not None]
    wall = [r["wall_clock_seconds"] / 60 for r in runs]
    lines.append(f"| {arm} | {len(runs)} | {mean:.2f} | "
                 f"{', '.join(f'{t:.2f}' for t in tests)} | "
                 f"{sum(valid) / len(valid) if valid else math.nan:.2f} | "
                 f"{sum(wall) / len(wall) if wall else math.nan:.1f} |")
(root / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "$(date -u '+%F %T') ablation done"
