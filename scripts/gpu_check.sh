#!/usr/bin/env bash
# GPU check of the fast trainer: `ablate bench` (plain-56, batch 128: the standard loop,
# each speed feature alone and added one at a time, then torch.compile on top), the worker sweep
# (1/2/4/8 trainers packed on one GPU, as processes and as CUDA streams), a packed smoke grid and
# the CUDA tests. Runs on any CUDA machine from the repo root with the project importable
# (PYTHONPATH=$PWD; no console script needed). Writes to ${OUT:-/tmp/gpu-check} (7 files: bench
# JSON, sweep JSON, logs) and prints every table again at the end. A global budget (BUDGET
# seconds, default 470) caps each step's time limit, so the whole check stays under ~8 minutes.
#
# On a GPU machine without a package index whose Python has torch but not MLflow, Optuna or
# pydantic: download their wheels elsewhere into .whl/ (pip download --no-deps --only-binary=:all:
# --python-version 3.12 -d .whl mlflow-skinny optuna pydantic pydantic-core sqlalchemy alembic
# ... and their pure-Python dependencies), copy the checkout with .whl/ there, then run:
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 bash scripts/gpu_check.sh
# The synthetic 3x32x32 dataset is generated, so no data travels.
#
# Dry run on a CPU (checks that everything it calls works; the numbers mean nothing):
#   DEVICE=cpu MODEL=plain-8-w8 BATCH=32 PYTHON=.venv/bin/python OUT=/tmp/gpu-dry bash scripts/gpu_check.sh
set -uo pipefail

OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-plain-56}
BATCH=${BATCH:-128}
BUDGET=${BUDGET:-470}
export PYTHONPATH=${PYTHONPATH:-$PWD}
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-160}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
deadline=$((SECONDS + BUDGET))
failed=()

say() { echo "== $*" | tee -a "$LOG"; }

# step NAME CAP_SECONDS OUTFILE COMMAND...: run COMMAND with stdout to OUTFILE (or the log when
# OUTFILE is -), stderr to the log, under min(CAP, what is left of the budget).
step() {
  local name=$1 cap=$2 out=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    say "$name: SKIPPED (budget spent: ${left}s left)"
    failed+=("$name (skipped)")
    return
  fi
  say "$name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  if [[ $out == - ]]; then
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$limit" "$@" >"$out" 2> >(tee -a "$LOG" >&2)
    rc=$?
  fi
  say "$name: exit $rc after $((SECONDS - t0))s"
  ((rc == 0)) || failed+=("$name (exit $rc)")
}

BENCH=("$PY" -m resnet_ablate bench --model "$MODEL" --batch "$BATCH" --device "$DEVICE")
show() { [[ -s $1 ]] && "$PY" -m resnet_ablate.bench.step "$1" 2>&1 | tee -a "$LOG"; }

say "device"
{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"cudnn {torch.backends.cudnn.version()}, {os.cpu_count()} cpus, load {os.getloadavg()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"capability {p.major}.{p.minor}")
else:
    print("no CUDA device")
EOF
} 2>&1 | tee -a "$LOG"

FEATURES=resident,bf16,channels_last,cuda_graph
# 1. The main table: the standard loop, each feature alone, then added one at a time.
step bench 150 "$OUT/bench.json" "${BENCH[@]}" --features "$FEATURES" --each --json
show "$OUT/bench.json"
# 2. The CUDA tests (graph vs eager training, graph capture, inductor, bench rows on CUDA).
step cuda-tests 150 - "$PY" -m pytest -q -p no:cacheprovider tests -k cuda
# 3. Packing: N trainers at once, as `ablate run --workers N` starts them, then on CUDA streams.
step sweep-processes 120 "$OUT/sweep-processes.json" \
  "${BENCH[@]}" --features "$FEATURES" --workers-sweep 1,2,4,8 --pack processes --seconds 4 --json
show "$OUT/sweep-processes.json"
step sweep-streams 75 "$OUT/sweep-streams.json" \
  "${BENCH[@]}" --features "$FEATURES" --workers-sweep 1,2,4,8 --pack streams --seconds 4 --json
show "$OUT/sweep-streams.json"
# 4. A packed smoke grid end to end (MLflow store and report in a temporary folder).
results=$(mktemp -d /tmp/gpu-check-smoke.XXXXXX)
t0=$SECONDS
step smoke-grid 90 - "$PY" -m resnet_ablate run experiments/smoke.yaml --workers 4 \
  --device "$DEVICE" --results "$results"
say "smoke grid wall time: $((SECONDS - t0))s"
step smoke-ls 30 - "$PY" -m resnet_ablate ls experiments/smoke.yaml --results "$results"
"$PY" - "$results/smoke/summary.csv" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError as err:
    sys.exit(f"no summary: {err}")
for row in rows:
    print({k: row[k] for k in row if k in ("label", "status", "epochs_done", "wall_seconds",
                                           "mean_images_per_second", "final_train_err")})
EOF
# 5. torch.compile on top of everything (its compile time is reported apart); also a second
#    measurement of the ladder of step 1, to see how repeatable the numbers are.
step bench-compile 200 "$OUT/bench-compile.json" \
  "${BENCH[@]}" --features "$FEATURES,compile" --repeats 3 --json
show "$OUT/bench-compile.json"

say "summary (all tables again; JSON in $OUT)"
for f in bench bench-compile sweep-processes sweep-streams; do show "$OUT/$f.json"; done
if ((${#failed[@]})); then
  say "FAILED: ${failed[*]}"
  exit 1
fi
say "all steps passed in $((SECONDS))s"
