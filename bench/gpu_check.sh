#!/usr/bin/env bash
# One-call GPU check: versions, install, the test suite natively on CUDA, the kernel compile check,
# the benchmarks at full size, and the markdown results table (printed last).
#
#   bash bench/gpu_check.sh            # on a CUDA machine (torch and Triton preinstalled, no network)
#   bash bench/gpu_check.sh --dry-run  # anywhere: CPU, reference ops, tiny sizes, a fast test subset
#
# Writes logs, the benchmark JSON and RESULTS.md into $OUT if set, else bench/results/. Every phase
# runs under `timeout`, within a total budget (GPU_CHECK_BUDGET_S, default 480 s on a GPU) so that
# the whole check fits in 8 minutes; the most important phases run first, and a phase that fails or
# runs out of time is reported while the phases after it still run. Exits non-zero if any phase failed.
set -euo pipefail

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

# Settings that would silently change what runs: the kernels run natively, at full size, by default.
unset TRITON_INTERPRET FASTFOOF_BACKEND FASTFOOF_BENCH_SMOKE
if ((DRY_RUN)); then
  export FASTFOOF_BENCH_SMOKE=1
  # A dry run gets whatever machine is at hand, often a small busy CPU one: there the compile check
  # alone (every kernel built for sm_80 and sm_90 on the CPU) took 247 s with another job on both
  # cores, and a second torch thread made the smoke benchmarks several times slower. So its phase caps
  # are CAP_SCALE times the GPU run's, within a budget to match, and torch runs on one thread.
  CAP_SCALE=10
  BUDGET_S="${GPU_CHECK_BUDGET_S:-2400}"
  export OMP_NUM_THREADS=1
  # The reference path and the optimizer: the Triton kernels' own tests need the interpreter (slow on CPU).
  TESTS=(tests/test_reference_ops.py tests/test_optimizer.py)
else
  CAP_SCALE=1
  BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
  TESTS=(tests/)
fi

declare -a SUMMARY=()
FAILED=0

remaining() { echo $((BUDGET_S - SECONDS)); }

# phase NAME CAP_SECONDS COMMAND...: run COMMAND with its output in $OUT_DIR/NAME.log, under a timeout
# of CAP_SECONDS (times CAP_SCALE) or what is left of the budget; print the log's tail and record the outcome.
phase() {
  local name="$1" cap=$(($2 * CAP_SCALE))
  shift 2
  local left
  left="$(remaining)"
  local limit=$((cap < left ? cap : left))
  local log="$OUT_DIR/$name.log"
  if ((limit < 5)); then
    echo "== $name: not run, the ${BUDGET_S} s budget is spent"
    SUMMARY+=("$name|NOT RUN (budget spent)|0")
    FAILED=1
    return 0
  fi
  echo "== $name (limit ${limit} s): $*"
  local start=$SECONDS status rc=0
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  case "$rc" in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  tail -n 15 "$log" | sed 's/^/    /'
  echo "== $name: $status ($((SECONDS - start)) s; log: $log)"
  SUMMARY+=("$name|$status|$((SECONDS - start))")
}

echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)$( ((DRY_RUN)) && echo ' (dry run: CPU, reference ops, smoke sizes)')"
echo "== output: $OUT_DIR; budget ${BUDGET_S} s"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv || true
else
  echo "nvidia-smi: not found"
fi
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT_DIR/versions.log"
import platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"{torch.get_num_threads()} CPU threads")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: not importable ({error})")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
else:
    print("cuda: not available")
EOF

if ! ((DRY_RUN)); then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: torch sees no CUDA device (use --dry-run on a CPU machine)')"
fi

if ((DRY_RUN)) && "$PYTHON" -c "import fastfoof" >/dev/null 2>&1; then
  echo "== install: skipped (dry run, fastfoof already importable)"
  SUMMARY+=("install|skipped (already importable)|0")
else
  phase install 120 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
fi

JSONS=()
# bench NAME CAP SUITE [PYTEST ARGS...]: one pytest per (part of a) suite, each with its own JSON, so a
# part stopped by its timeout loses only its own rows.
bench() {
  local name="$1" cap="$2"
  shift 2
  rm -f "$OUT_DIR/$name.json"
  phase "$name" "$cap" "$PYTHON" -m pytest -q -p no:cacheprovider "$@" --benchmark-json="$OUT_DIR/$name.json"
  if [[ -s "$OUT_DIR/$name.json" ]]; then JSONS+=("$OUT_DIR/$name.json"); fi
}

# Most important first: the budget runs out for the last phases, not the first.
# End to end is the headline number; its compiled rows (inductor compiles) go in a part of their own.
bench bench_e2e 120 bench/test_bench_e2e.py -k "not compiled and not T500 and not rank and not stats_quarter"
# Not -x: one failure must not hide the others on a machine we hold for minutes.
phase tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 "${TESTS[@]}"
bench bench_patch_gram 75 bench/test_bench_patch_gram.py
bench bench_damped_inverse 75 bench/test_bench_damped_inverse.py
bench bench_update 45 bench/test_bench_update.py
bench bench_e2e_compiled 120 bench/test_bench_e2e.py -k "compiled"

if ((DRY_RUN)) && ! "$PYTHON" -c "import triton" >/dev/null 2>&1; then
  # Triton comes with CUDA builds of torch and with the test extra, not with a plain CPU install.
  echo "== compile_check: skipped (dry run, Triton not installed)"
  SUMMARY+=("compile_check|skipped (no Triton)|0")
elif "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fastfoof.kernels.compile_check') is None)" 2>/dev/null; then
  # The JSON (stdout) goes to its own file; bench/report.py tabulates it into RESULTS.md.
  phase compile_check 60 bash -c '"$1" -m fastfoof.kernels.compile_check --json >"$2"' compile_check \
    "$PYTHON" "$OUT_DIR/compile_check.json"
else
  echo "== compile_check: skipped (fastfoof.kernels.compile_check does not exist)"
  SUMMARY+=("compile_check|skipped (no module)|0")
fi

# The paper's T=500 schedule (500 rounds a row) and the cost floor options (stats_batch, rank), if time is left
bench bench_e2e_schedules 90 bench/test_bench_e2e.py -k "T500 or rank or stats_quarter"

COMPILE_JSON=()
if [[ -s "$OUT_DIR/compile_check.json" ]]; then COMPILE_JSON=(--compile-check "$OUT_DIR/compile_check.json"); fi
if ((${#JSONS[@]})); then
  phase report 30 "$PYTHON" bench/report.py "${JSONS[@]}" "${COMPILE_JSON[@]}" -o "$OUT_DIR/RESULTS.md"
else
  echo "== report: no benchmark JSON was written"
  SUMMARY+=("report|NOT RUN (no JSON)|0")
  FAILED=1
fi

echo
if [[ -s "$OUT_DIR/RESULTS.md" ]]; then
  cat "$OUT_DIR/RESULTS.md"
fi
echo
echo "| phase | outcome | seconds |"
echo "|---|---|---|"
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name status seconds <<<"$row"
  echo "| $name | $status | $seconds |"
done
echo "total: ${SECONDS} s; logs, JSON and RESULTS.md in $OUT_DIR"
if ((FAILED)); then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: OK"
