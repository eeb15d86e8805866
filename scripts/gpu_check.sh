#!/usr/bin/env bash
# GPU check of the trainer's GPU path, in at most 6 minutes of wall time: a global budget
# (BUDGET seconds, default 330) caps every step, a step past its limit is killed, and a step that
# would start with less than 20 s left is skipped; so a 15-minute device allowance holds the
# machine's start, this check and a rerun. Run it from the repository root of a checkout:
#     bash scripts/gpu_check.sh
# On an offline GPU machine whose Python lacks MLflow, Optuna, pydantic, typer or pytest, first
# run `bash scripts/gpu_prepare.sh` where PyPI is reachable and carry `.whl` and `data` along:
# this script then installs .whl/*.whl into /tmp/site (no index, no dependency resolution) and
# puts /tmp/site first on PYTHONPATH. Fashion-MNIST is read from data/ (else $ABLATE_DATA or the
# system copy); without it the smoke grid runs on synthetic data, and summary.txt says so.
#
# It writes, under $OUT (default /tmp/gpu-check), each file as soon as its step ends, so a killed
# step loses nothing before it:
#   gpu_check.log     everything below as it ran: each step's command, exit code and seconds
#   summary.txt       one line per step (passed, failed with its exit code, or skipped, with
#                     its seconds), then the total wall time; one line is added per step ended
#   env.txt           Python, torch, CUDA, cuDNN versions, the GPUs (nvidia-smi), what it installed
#   cuda-tests.txt    pytest of tests/test_cuda.py: the trainer's and the bench's CUDA tests
#   cuda-tests.xml    the same as JUnit XML
#   bench.json        `ablate bench --each --json` of MODEL at BATCH: the standard loop, each
#                     feature alone, then the features added one at a time (what each row ran,
#                     and the device set-up, are in the JSON)
#   bench.txt         that result as a table
#   smoke-grid.yaml   the packed smoke grid: plain and residual nets at SMOKE_DEPTHS on
#                     Fashion-MNIST, SMOKE_EPOCHS epochs, SMOKE_WORKERS cells at once
#   smoke-grid.txt    its `ablate run` output (MLflow store in a temporary folder, no report)
#   smoke-cells.json  per cell: status, reason, its ablate.* tags (what ran: ablate.step,
#                     ablate.graph_fallback, ablate.device) and final metrics (mean images/s)
#   sweep.json        `ablate bench --workers-sweep WORKERS --pack processes --json`: N trainers
#                     at once, each process set up as `ablate run --workers N` sets up its workers
#   sweep.txt         that result as a table
#   cuda-model-tests.txt  pytest -m cuda of tests/test_models.py (graph capture of each
#                     shortcut, inductor in bf16 channels-last): last, as compiling is slow
#
# Settings (environment): OUT, PYTHON (python3), DEVICE (cuda), MODEL (plain-56), BATCH (128),
# FEATURES, BUDGET, BENCH_ARGS (extra `ablate bench` options), WORKERS (1,2,4), SWEEP_SECONDS (4),
# SMOKE_DEPTHS ("20, 56"), SMOKE_WIDTH (16), SMOKE_EPOCHS (2), SMOKE_SUBSET (30000),
# SMOKE_BATCH (128), SMOKE_WORKERS (4), WHEELS (.whl), SITE (/tmp/site).
# A dry run on a CPU (it checks that every step runs; the numbers mean nothing) is a test:
# tests/test_gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-plain-56}
BATCH=${BATCH:-128}
FEATURES=${FEATURES:-resident,bf16,channels_last,cuda_graph}
BUDGET=${BUDGET:-330}
BENCH_ARGS=${BENCH_ARGS:-}
WORKERS=${WORKERS:-1,2,4}
SWEEP_SECONDS=${SWEEP_SECONDS:-4}
SMOKE_DEPTHS=${SMOKE_DEPTHS:-20, 56}
SMOKE_WIDTH=${SMOKE_WIDTH:-16}
SMOKE_EPOCHS=${SMOKE_EPOCHS:-2}
SMOKE_SUBSET=${SMOKE_SUBSET:-30000}
SMOKE_BATCH=${SMOKE_BATCH:-128}
SMOKE_WORKERS=${SMOKE_WORKERS:-4}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}

export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-160}
unset MLFLOW_TRACKING_URI
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
deadline=$((SECONDS + BUDGET))
failed=0

say() { echo "== $*" | tee -a "$LOG"; }
note() { echo "$*" | tee -a "$LOG" >>"$SUMMARY"; }

# step NAME CAP OUTFILE COMMAND...: run COMMAND under min(CAP, what is left of the budget), its
# stdout into OUTFILE (or only the log when OUTFILE is -), its stderr into the log.
step() {
  local name=$1 cap=$2 out=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    note "$name: skipped (budget spent: ${left}s left)"
    failed=1
    return 1
  fi
  say "$name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  if [[ $out == - ]]; then
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$out" 2>>"$LOG"
  fi
  rc=$?
  if ((rc == 0)); then
    note "$name: passed in $((SECONDS - t0))s"
  else
    note "$name: FAILED (exit $rc$( ((rc == 124 || rc == 137)) && echo ", out of time")) in $((SECONDS - t0))s"
    failed=1
  fi
  return $rc
}

# 0. What it runs on; the missing packages installed offline from the wheels given.
{
  needed="import mlflow, optuna, pydantic, typer, pytest"
  if ! "$PY" -c "$needed" 2>/dev/null; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
      "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl 2>&1 | grep -v "as the 'root' user"
      export PYTHONPATH=$SITE:$PYTHONPATH
    else
      echo "missing packages and no wheels in $WHEELS: run scripts/gpu_prepare.sh where PyPI is reachable"
    fi
  fi
  "$PY" -c "$needed" && echo "imports: mlflow, optuna, pydantic, typer, pytest found"
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" - <<'EOF'
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"cudnn {torch.backends.cudnn.version()}, {os.cpu_count()} cpus, load {os.getloadavg()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"capability {p.major}.{p.minor}")
if not torch.cuda.is_available():
    print("no CUDA device")
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >>"$LOG"
note "env: env.txt written after ${SECONDS}s"

# 1. The CUDA tests, listed by module (a missing import fails the step, never collects 0 tests).
step cuda-tests 90 "$OUT/cuda-tests.txt" "$PY" -m pytest -q -rs -p no:cacheprovider \
  --junitxml "$OUT/cuda-tests.xml" tests/test_cuda.py

# 2. The bench: the standard loop, each feature alone, then added one at a time.
BENCH=("$PY" -m resnet_ablate bench --model "$MODEL" --batch "$BATCH" --device "$DEVICE")
# shellcheck disable=SC2206  # BENCH_ARGS is a list of options, split on spaces
EXTRA=($BENCH_ARGS)
step bench 110 "$OUT/bench.json" "${BENCH[@]}" --features "$FEATURES" --each --json "${EXTRA[@]}" &&
  "$PY" -m resnet_ablate.bench.tables "$OUT/bench.json" >"$OUT/bench.txt" 2>>"$LOG"

# 3. A packed smoke grid of real cells, end to end through `ablate run` and MLflow.
fmnist=""
for dir in "$PWD/data" "${ABLATE_DATA:-}" /usr/share/datasets/fashion-mnist; do
  if [[ -n $dir ]] && compgen -G "$dir/train-images-idx3-ubyte*" >/dev/null; then
    fmnist=$dir
    break
  fi
done
if [[ -n $fmnist ]]; then
  export ABLATE_DATA=$fmnist
  data="{name: fashion-mnist, augment: true, train_subset: $SMOKE_SUBSET, test_subset: 2000}"
else
  note "smoke grid: no Fashion-MNIST (data/, \$ABLATE_DATA, system copy): synthetic data instead"
  data="{name: synthetic, augment: true}"
fi
cat >"$OUT/smoke-grid.yaml" <<EOF
name: gpu-smoke
description: Packed GPU smoke grid, plain and residual nets, ${SMOKE_WORKERS} cells at once.
base:
  data: $data
  model: {block: basic, order: post, width: $SMOKE_WIDTH}
  train: {epochs: $SMOKE_EPOCHS, batch_size: $SMOKE_BATCH, lr: 0.1, momentum: 0.9,
          weight_decay: 1.0e-4, schedule: step, milestones: [0.5], gamma: 0.1}
grid:
  model.shortcut: [none, identity]
  model.depth: [$SMOKE_DEPTHS]
seeds: [0]
EOF
results=$(mktemp -d /tmp/gpu-check-smoke.XXXXXX)
step smoke-grid 90 "$OUT/smoke-grid.txt" "$PY" -m resnet_ablate run "$OUT/smoke-grid.yaml" \
  --workers "$SMOKE_WORKERS" --device "$DEVICE" --results "$results" --no-report
"$PY" - "$results" "$OUT/smoke-cells.json" 2>>"$LOG" <<'EOF' | tee -a "$LOG" >>"$SUMMARY"
import json, sys
from pathlib import Path
from mlflow import MlflowClient

client = MlflowClient(tracking_uri=f"sqlite:///{Path(sys.argv[1]).resolve() / 'mlflow.db'}")
experiment = client.get_experiment_by_name("gpu-smoke")
runs = client.search_runs([experiment.experiment_id]) if experiment else []
cells = [
    {
        "run": run.info.run_name,
        "status": run.data.tags.get("ablate.status"),
        "reason": run.data.tags.get("ablate.reason", ""),
        "tags": {k: v for k, v in sorted(run.data.tags.items()) if k.startswith("ablate.")},
        "metrics": dict(sorted(run.data.metrics.items())),
    }
    for run in runs
    if run.data.tags.get("ablate.role") != "grid"
]
Path(sys.argv[2]).write_text(json.dumps(cells, indent=2) + "\n")
ran = [
    f"{c['run']}: {c['status']}, {c['tags'].get('ablate.step', 'step not tagged')}, "
    f"{c['metrics'].get('mean_images_per_second', float('nan')):,.0f} images/s"
    for c in cells
]
print("smoke cells: " + ("; ".join(ran) or "none recorded"))
EOF

# 4. N trainers at once, as `ablate run --workers N` starts them.
step sweep 75 "$OUT/sweep.json" "${BENCH[@]}" --features "$FEATURES" --workers-sweep "$WORKERS" \
  --pack processes --seconds "$SWEEP_SECONDS" --json "${EXTRA[@]}" &&
  "$PY" -m resnet_ablate.bench.tables "$OUT/sweep.json" >"$OUT/sweep.txt" 2>>"$LOG"

# 5. The models' CUDA tests (torch.compile's inductor takes its time): last.
step cuda-model-tests 75 "$OUT/cuda-model-tests.txt" "$PY" -m pytest -q -rs -p no:cacheprovider \
  -m cuda tests/test_models.py

note "total: ${SECONDS}s of a ${BUDGET}s budget; $( ((failed)) && echo "some steps failed or were skipped" || echo "every step passed")"
cat "$SUMMARY"
exit $failed
