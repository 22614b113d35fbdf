#!/usr/bin/env bash
# The one script for the GPU machine (an H200 without network access).
#
#   bench/device_check.sh [OUT_DIR]      (default ./device-out)
#
# Installs the project without downloading anything, builds csrc/ for sm_90a with all cores,
# runs `pytest -m gpu` per op (PYTEST_BUDGET s each), then `python -m bench <op> --quick` for
# each timed op (BENCH_BUDGET s each), then the end-to-end goals (`python -m bench e2e --quick`:
# ViT-L patched vs timm eager bf16, E2E_BUDGET s), then a short l16 training / inference run of
# the reference model (TRAIN_BUDGET s), and leaves in OUT_DIR (at most 8 files, for the device
# tool): summary.txt, bench.csv, e2e.csv, train_bench.csv, pytest_gpu.log, build.log, info.txt
# and plots.tar.gz (PNGs + the bench logs, removed once tarred). Prints a short table, the e2e
# goals and the reference-model rows last.
# Budget: the whole run ends within TOTAL_BUDGET seconds (default 420: the device tool allows 10
# minutes a command and a task 15 minutes of device time in all, start-up included, so one run
# leaves room to rerun it once). Each step has its own cap (build 180; PYTEST_BUDGET 35 per op
# group; BENCH_BUDGET 45 per op; E2E_BUDGET 120; TRAIN_BUDGET 60) and never more than what is
# left of the total less 20 s for the summary; a step that would start with under 10 s left is
# skipped and said so. Steps run in order of what matters most: build, correctness, per-op
# goals, whole models.
# Not yet run on a GPU: the budgets are estimates.
set -uo pipefail
OUT=$(mkdir -p "${1:-./device-out}" && cd "${1:-./device-out}" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export XRAY_OPS_CUDA_ARCHS=${XRAY_OPS_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export XRAY_OPS_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
TOTAL=${TOTAL_BUDGET:-420}
# cap SECONDS -> min(SECONDS, what is left of TOTAL less 20 s for the summary); 0 = no time left
cap() {
  local left=$(( TOTAL - ( $(date +%s) - T0 ) - 20 ))
  (( left < 10 )) && { echo 0; return; }
  (( $1 < left )) && echo "$1" || echo "$left"
}
# run_capped SECONDS NAME CMD...: CMD under timeout -s INT (pytest and the benches stop cleanly
# on SIGINT and keep what they finished), or a "skipped" line when the total is spent
run_capped() {
  local t; t=$(cap "$1"); shift; local name=$1; shift
  if (( t == 0 )); then stamp "$name SKIPPED: TOTAL_BUDGET=${TOTAL}s spent"; return 124; fi
  timeout -s INT "$t" "$@"
}
: > "$OUT/summary.txt"

stamp "install (no downloads)"
XRAY_OPS_SKIP_CUDA_BUILD=1 $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . \
  > "$OUT/build.log" 2>&1 || stamp "pip install failed (see build.log)"

stamp "build csrc for sm_$XRAY_OPS_CUDA_ARCHS with MAX_JOBS=$MAX_JOBS"
if run_capped 180 build $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1; then
  stamp "build ok"
else
  stamp "BUILD FAILED (tail of build.log below)"; tail -20 "$OUT/build.log"
fi
$PY -m xray_ops info > "$OUT/info.txt" 2>&1

# One budget per op (Triton compiles dominate on a fresh machine, and files run in name order:
# without it the last op would get no time). SIGINT on timeout: pytest stops cleanly and still
# prints what failed so far.
: > "$OUT/pytest_gpu.log"
for group in evit_select tome flash_attention int8 patch foundation layer_norm bias_gelu lion \
             contrastive; do
  stamp "pytest -m gpu tests/test_${group}*"
  run_capped ${PYTEST_BUDGET:-35} "pytest $group" $PY -m pytest -m gpu -q -p no:cacheprovider -rfE \
    --durations=5 tests/test_${group}*.py >> "$OUT/pytest_gpu.log" 2>&1
  stamp "pytest $group exit $?: $(grep -E '(passed|failed|skipped|error)' "$OUT/pytest_gpu.log" | tail -1)"
done

# one budget per op, so a slow autotune in one cannot starve the others; each op appends its
# rows to the CSV as soon as it finishes
: > "$OUT/bench.log"
for op in evit_select tome_merge flash_attention int8 layer_norm bias_gelu lion contrastive_loss \
          contrastive_memory; do
  stamp "bench $op --quick"
  run_capped ${BENCH_BUDGET:-45} "bench $op" $PY -m bench "$op" --quick --csv "$OUT/bench.csv" \
    >> "$OUT/bench.log" 2>&1
  stamp "bench $op exit $?"
done
# whole models: ViT-L as timm runs it vs patched (goals: attention-only training step >= 1.15x,
# ToMe r=8 + EViT + int8 inference >= 2.5x timm eager bf16); rows land in e2e.csv per model
stamp "bench e2e --quick"
run_capped ${E2E_BUDGET:-120} e2e $PY -m bench e2e --quick --csv "$OUT/e2e.csv" \
  > "$OUT/e2e.log" 2>&1
stamp "bench e2e exit $?"
# the reference model (issue 10): a short l16 training run in bf16 (ops=xray vs ops=torch eager,
# then torch.compile of each) and l16 inference (float eager vs ToMe r=8, int8, both); rows are
# appended as each mode finishes, the compile modes run last and are skipped past --budget
stamp "train bench l16 bf16"
TB=$(cap ${TRAIN_BUDGET:-60})
if (( TB < 30 )); then stamp "train bench SKIPPED: under 30 s of TOTAL_BUDGET left"; else
timeout -s INT $TB $PY -m reference_model.train.bench --config l16 --device cuda --batch 64 \
  --steps 5 --budget $(( TB - 20 )) --csv "$OUT/train_bench.csv" >> "$OUT/bench.log" 2>&1
stamp "train bench exit $?"; fi
$PY -m bench plot --csv "$OUT/bench.csv" --out "$OUT/plots" > /dev/null 2>&1
[ -f "$OUT/e2e.csv" ] && $PY -m bench e2e_report --csv "$OUT/e2e.csv" --out "$OUT/plots" \
  > /dev/null 2>&1
tar -czf "$OUT/plots.tar.gz" -C "$OUT" plots bench.log e2e.log 2>/dev/null && rm -rf "$OUT/plots"

{
  echo; echo "== info =="; grep -E "device:|cuda |triton |extension" "$OUT/info.txt"
  echo; echo "== failures =="; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -15
  echo; echo "== bench (speedup vs eager) =="
  [ -f "$OUT/bench.csv" ] && $PY -m bench summary --csv "$OUT/bench.csv" | tail -80
  echo; echo "== e2e (whole models) =="; sed -n '/^model /,$p' "$OUT/e2e.log" | tail -25
  echo; echo "== reference model l16 (samples/s, vs torch eager) =="
  [ -f "$OUT/train_bench.csv" ] && $PY -c "import csv,sys
for r in csv.DictReader(open(sys.argv[1])): print(r['what'], r['mode'], r['samples_per_s'], r['vs_torch'], r['note'])" "$OUT/train_bench.csv"
} | tee -a "$OUT/summary.txt"
# both logs are inside plots.tar.gz: the device tool brings back at most 8 files
rm -f "$OUT/bench.log" "$OUT/e2e.log"
stamp "done"
