#!/usr/bin/env bash
# The issue-17 headline runs: ResNet-32 `original` and `preact`, recipe fast, 30 epochs,
# on CIFAR-10 ($DATA_DIR, else what resnet-graph finds), then `eval` of each run's final and best-validation checkpoints,
# single view and with --tta flip.
#
#   cd <worktree> && export FINALS_DIR=${FINALS_DIR:-$PWD/checkpoints/finals} && mkdir -p "$FINALS_DIR" &&
#       setsid nohup bash experiments/finals.sh > "$FINALS_DIR/run.log" 2>&1 < /dev/null &
#   .venv/bin/python experiments/finals_table.py "$FINALS_DIR"      # the table, from the files
#
# RUNS lists model:seed in the order they train (default: seed 0 of both models first,
# so that a stop leaves the comparison, then seed 1). All runs go into one `experiment`
# folder ($FINALS_DIR: histories.h5, report.md/json, one folder per run). Resumable: run
# it again and `experiment` keeps finished runs and resumes an unfinished one from its
# checkpoint; an evaluation whose JSON exists is not repeated. FLAGS are added to every
# `experiment` (default none: the recipe as it is in the checkout).
#
# Across machines: CARRY names a snapshot made by `experiments/carry.py save` (kept in
# docs/runs/finals/). When set, the snapshot is restored into $FINALS_DIR first (only the run
# folders that are missing there), so the runs resume from the carried checkpoints; git
# carries no checkpoints, so from a fresh clone an unfinished run starts again. Save
# one before a session ends:
#   .venv/bin/python experiments/carry.py save "$FINALS_DIR" docs/runs/finals
#
# Stop it with `kill -- -<pgid>`. The code is the editable install of $REPO (default:
# the current folder): do not edit that folder while it runs.
set -u

REPO=${REPO:-$(pwd)}
FINALS_DIR=${FINALS_DIR:-$REPO/checkpoints/finals}
# The data: $DATA_DIR when set, else what resnet-graph finds itself ($RESNET_GRAPH_DATA_DIR,
# else the user cache, downloaded there if missing).
DATA=()
if [ -n "${DATA_DIR:-}" ]; then DATA=(--data-dir "$DATA_DIR"); fi
EPOCHS=${EPOCHS:-30}
DEPTH=${DEPTH:-32}
PRECISION=${PRECISION:-fp32}
RUNS=${RUNS:-"original:0 preact:0 original:1 preact:1"}
FLAGS=${FLAGS:-}
CARRY=${CARRY:-}
EXE="$REPO/.venv/bin/resnet-graph"

if [ ! -x "$EXE" ]; then
    echo "no $EXE: run this from a checkout with 'make install' done (or set REPO)" >&2
    exit 1
fi
mkdir -p "$FINALS_DIR/logs"
if [ -n "$CARRY" ]; then
    "$REPO/.venv/bin/python" "$REPO/experiments/carry.py" restore "$CARRY" "$FINALS_DIR" || exit 1
fi
echo "$(date -u '+%F %T') finals in $FINALS_DIR from $REPO at" \
     "$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)" \
     "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(uncommitted changes!)')"

stopped() {   # exit status of a command killed by a signal: stop here, resumable
    if [ "$1" -ge 128 ]; then
        echo "stopped (exit $1); run this script again to continue"
        exit "$1"
    fi
}

models=""
seeds=""
done_runs=""
for item in $RUNS; do
    model=${item%%:*}
    seed=${item##*:}
    # shellcheck disable=SC2086  # FLAGS are words
    set -- "$EXE" experiment --recipe fast --models "$model" --depth "$DEPTH" --epochs "$EPOCHS" \
        --precision "$PRECISION" ${DATA[@]+"${DATA[@]}"} --seeds "$seed" --out "$FINALS_DIR" $FLAGS
    echo "$(date -u '+%F %T') [$model seed $seed] $*"
    "$@" 2>&1 | tee -a "$FINALS_DIR/logs/$model-s$seed.log"
    status=${PIPESTATUS[0]}
    echo "$(date -u '+%F %T') [$model seed $seed] exit $status"
    stopped "$status"
    run="$FINALS_DIR/$model-$DEPTH-s$seed"
    for variant in final final-flip best best-flip; do
        json="$run/eval-$variant.json"
        [ -s "$json" ] && continue
        args=(eval --ckpt "$run" ${DATA[@]+"${DATA[@]}"} --json)
        case "$variant" in *best*) args+=(--best) ;; esac
        case "$variant" in *flip) args+=(--tta flip) ;; esac
        if "$EXE" "${args[@]}" > "$json.tmp"; then
            mv "$json.tmp" "$json"
            echo "$(date -u '+%F %T') [$model seed $seed] eval $variant:" \
                 "$("$REPO/.venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$json")"
        else
            status=$?
            rm -f "$json.tmp"
            echo "$(date -u '+%F %T') [$model seed $seed] eval $variant failed (exit $status)"
            stopped "$status"
        fi
    done
    case " $models " in *" $model "*) ;; *) models="$models $model" ;; esac
    case " $seeds " in *" $seed "*) ;; *) seeds="$seeds $seed" ;; esac
    case " $done_runs " in *" $item "*) ;; *) done_runs="$done_runs $item" ;; esac
done

# The report over every run, when RUNS is every model with every seed (all finished by
# now, so nothing trains; otherwise `experiment` would train the missing pairs).
n_models=$(echo $models | wc -w); n_seeds=$(echo $seeds | wc -w); n_runs=$(echo $done_runs | wc -w)
if [ $((n_models * n_seeds)) -eq "$n_runs" ]; then
    models=$(echo $models | tr ' ' ','); seeds=$(echo $seeds | tr ' ' ',')
    # shellcheck disable=SC2086
    "$EXE" experiment --recipe fast --models "$models" --depth "$DEPTH" --epochs "$EPOCHS" \
        --precision "$PRECISION" ${DATA[@]+"${DATA[@]}"} --seeds "$seeds" --out "$FINALS_DIR" \
        $FLAGS > /dev/null || echo "report failed"
fi
echo "$(date -u '+%F %T') finals done"
