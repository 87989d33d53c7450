#!/usr/bin/env bash
# fastclip's whole check on a GPU machine (torch installed, no network), in ONE call of the device
# tool: about 6.5 minutes on an H200, budget 420 s. gpu_check/README.md gives the exact call.
#
#   gpu_check/run.sh [--dry-run] [--out DIR] [--export DIR] [--budget SECONDS] STAGE[:STEP,...]...
#
# Stages, run in the order given ("all": every one, in this order, most important first):
#   build     build the extension with its CUDA kernels against this machine's torch
#             (gpu_check/build_cache.py: skipped when the build in the tree, or one carried in
#             build/gpu-cache/, was made from the same sources and toolchain), then
#             fastclip.backend() must be "cuda". Every call runs it first, named or not: each
#             remote call starts from a fresh copy of the working tree.
#   tests     the whole test suite, the CUDA tests and the CPU ones, with pytest-xdist (-n 12) when
#             it is installed (GPU_CHECK_TESTS="tests/test_x.py ..." runs those files instead)
#   sanitize  compute-sanitizer on gpu_check/sanitize_driver.py: memcheck of the fused kernel (with
#             a > 4096-tile set), memcheck of the three-launch fallback, racecheck, synccheck
#   bench     bench/bench_gpu.py --quick and bench/bench_update.py --device cuda --quick (JSON kept);
#             the full benchmark is a second, optional call (gpu_check/README.md)
#   profile   gpu_check/profile_update.py: where the clip's time goes inside a real update, and
#             the fused kernel of a GPT-2-sized set under Nsight Compute (ncu)
#   trainers  examples/{dqn,a2c,reinforce}.py --device cuda, briefly (gymnasium: carried wheels)
# STAGE:STEP,... runs only those steps of a stage (e.g. sanitize:racecheck,synccheck), to finish
# in a later call what an earlier one had no time for.
#
# Results: OUT (default bench/results/<date>-<gpu>/) gets env-<time>.txt, and per stage
# <stage>/<step>.log, <stage>/<step>.step.tsv (exit status, seconds, command) and
# <stage>/summary.json, and over all stages summary.{txt,json} (gpu_check/summary.py: only a
# non-zero exit status is a failure; what did not run is listed apart, with the reason).
# --export DIR (the device tool's $OUT) copies there what must come back: one archive of OUT,
# summary.{txt,json}, and a newly built extension archive to carry into the next call.
#
# Time: each step has a cap (about twice what it takes on an H200). A step starts only if the
# call's budget (--budget, default GPU_CHECK_BUDGET_S or 420 s) has at least half its cap left,
# and its limit is cut to what is left. Steps that do not start are reported as not run, with
# the STAGE:step to run in the next call.
#
# --dry-run (no GPU needed): runs the step machinery on synthetic steps (exit 0, exit 1, a time-out,
# a budget skip, a declared NOT RUN) and checks the summary counts them right, then checks that
# every command of the named stages resolves (gpu_check/dry_run.py). Nothing else runs.
#
# Exit status: 0 when no step failed (steps that did not run are not failures), 1 otherwise,
# 2 on a usage error.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
RESERVE=20  # seconds kept for the summary and the export
ALL_STAGES=(build tests sanitize bench profile trainers)
DRY_RUN=0 OUT_DIR="" EXPORT=""
export PYTHONUNBUFFERED=1  # a step killed at its limit keeps its log
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # fastclip, bench and gpu_check from this tree

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
stages=()
declare -A STEPS_OF
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --export) EXPORT=${2:?--export needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h|--help) usage 0 ;;
    all) stages+=("${ALL_STAGES[@]}") ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage ;;
    *)
      name=${1%%:*}
      [[ " ${ALL_STAGES[*]} " == *" $name "* ]] || { echo "gpu_check: unknown stage $name" >&2; usage; }
      stages+=("$name")
      [[ $1 == *:* ]] && STEPS_OF[$name]=${1#*:} ;;
  esac
  shift
done
((${#stages[@]})) || { echo "gpu_check: name the stages to run (or all)" >&2; usage; }
# build first, once, whether named or not; the rest in the order given, each once.
ordered=(build)
for s in "${stages[@]}"; do [[ " ${ordered[*]} " == *" $s "* ]] || ordered+=("$s"); done

# ---- the step machinery ---------------------------------------------------------------------

STAGE="" STAGE_DIR="" SKIP_REASON="" BUILD_FAILED=""

# record NAME RESULT SECONDS LIMIT CAP STARTED REASON COMMAND: the step's line for summary.py.
record() {
  local IFS=$'\t' fields=("$@")
  fields=("${fields[@]//$'\t'/ }")
  printf '%s\n' "${fields[*]//$'\n'/ }" >"$STAGE_DIR/$1.step.tsv"
}

now() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }

not_run() {
  local name=$1 reason=$2; shift 2
  echo "== $STAGE/$name: NOT RUN: $reason"
  record "$name" not-run 0 "" "" "$(now)" "$reason" "$*"
}

wanted() {
  local only=${STEPS_OF[$STAGE]:-}
  [[ -z $only || ",$only," == *",$1,"* ]]
}

# step NAME CAP CMD...: run CMD in the current stage under a time limit (CAP seconds, less if the
# call's budget has less left, but not less than half of CAP: then it does not start); its output
# goes to STAGE_DIR/NAME.log. Returns CMD's exit status (0 when it did not run).
step() {
  local name=$1 cap=$2; shift 2
  wanted "$name" || return 0
  if ((DRY_RUN)); then
    (IFS=$'\x1f'; printf '%s\n' "$STAGE"$'\x1f'"$name"$'\x1f'"$*") >>"$PLAN"
    return 0
  fi
  if [[ -n $SKIP_REASON ]]; then not_run "$name" "$SKIP_REASON" "$@"; return 0; fi
  local left=$((BUDGET - RESERVE - SECONDS)) need=$(((cap + 1) / 2))
  if ((left < need)); then
    not_run "$name" "time budget: ${left}s left in this call, the step may take up to ${cap}s: run '$STAGE:$name' in the next call" "$@"
    return 0
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS started rc
  started=$(now)
  echo "== $STAGE/$name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$STAGE_DIR/$name.log" 2>&1
  rc=$?
  tail -n 8 "$STAGE_DIR/$name.log" | sed 's/^/     /'
  echo "== $STAGE/$name: exit $rc after $((SECONDS - start))s"
  record "$name" "$rc" "$((SECONDS - start))" "$limit" "$cap" "$started" "" "$*"
  return "$rc"
}

# ---- the stages ---------------------------------------------------------------------------------

BACKEND_CHECK="import runpy, fastclip, fastclip._ops as o; runpy.run_module('fastclip.info', run_name='__main__'); \
assert fastclip.backend() == 'cuda' and o.CUDA_BUILT, f'no CUDA kernels: backend {fastclip.backend()}, {o.LOAD_ERROR}'"

stage_build() {
  local export_args=()
  [[ -n $EXPORT ]] && export_args=(--export "$EXPORT")
  step build 300 "$PYTHON" gpu_check/build_cache.py ensure "${export_args[@]}" || BUILD_FAILED=1
  [[ -n $BUILD_FAILED ]] && SKIP_REASON="the build failed: see build/build.log in the results"
  step backend 60 "$PYTHON" -c "$BACKEND_CHECK" || BUILD_FAILED=1
}

# pytest, with a traceback of every thread in the log when one test runs over 2 minutes (a hang:
# the step's time-out would otherwise kill it without a word).
pytest_step() {
  local name=$1 cap=$2; shift 2
  step "$name" "$cap" "$PYTHON" -m pytest -q -rs -p no:cacheprovider -o faulthandler_timeout=120 \
    --junitxml="$STAGE_DIR/$name.junit.xml" "$@"
}

# The whole suite in one pytest run: the CUDA tests, the property tests on CUDA tensors, and the
# CPU tests on this machine's torch. xdist shares the GPU among its workers (a context each).
stage_tests() {
  local parallel=()
  if ((DRY_RUN)) || "$PYTHON" -c "import xdist" 2>/dev/null; then parallel=(-n 12); fi
  local paths
  read -ra paths <<<"${GPU_CHECK_TESTS:-tests}"
  pytest_step suite 300 "${parallel[@]}" "${paths[@]}"
}

stage_sanitize() {
  local san
  san=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [[ ! -x $san ]]; then
    ((DRY_RUN)) && san=compute-sanitizer || SKIP_REASON="compute-sanitizer not found (on PATH, or $san)"
  fi
  # Torch's own probing calls, and the cooperative launch the kernels retry as the fallback when
  # it is too large, fail by design: API errors are not reported. Memory, race and barrier errors
  # in fastclip's kernels (only those are instrumented) set the exit status to 1.
  local opts=(--error-exitcode 1 --report-api-errors no --kernel-name kns=fastclip --target-processes all)
  local driver=("$PYTHON" gpu_check/sanitize_driver.py)
  # The grid cap keeps the cooperative launch small enough to fit even if instrumentation lowers
  # occupancy, so the fused kernel itself is what gets checked; without the caching allocator each
  # tensor is its own allocation, so memcheck sees an access past a tensor's end.
  local fused=(env FASTCLIP_CUDA_MAX_GRID=64) nocache=PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck 180 "${fused[@]}" "$nocache" "$san" --tool memcheck "${opts[@]}" "${driver[@]}" --big
  step memcheck_fallback 150 env FASTCLIP_CUDA_NO_COOP=1 "$nocache" "$san" --tool memcheck "${opts[@]}" "${driver[@]}" --big
  step racecheck 180 "${fused[@]}" "$san" --tool racecheck "${opts[@]}" "${driver[@]}"
  step synccheck 120 "${fused[@]}" "$san" --tool synccheck "${opts[@]}" "${driver[@]}"
}

stage_bench() {
  step bench_gpu 120 "$PYTHON" -m bench.bench_gpu --quick --json "$STAGE_DIR/bench_gpu.json"
  step bench_update_cuda 90 "$PYTHON" -m bench.bench_update --device cuda --quick --no-progress \
    --json "$STAGE_DIR/bench_update_cuda.json"
}

stage_profile() {
  step update 90 "$PYTHON" gpu_check/profile_update.py --out "$STAGE_DIR"
  # The fused kernel on a GPT-2-sized set under Nsight Compute: bandwidth, stalls, occupancy.
  local ncu
  ncu=$(command -v ncu || echo ncu)
  step kernel 120 "$ncu" --clock-control none --kernel-name regex:fused_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \
    "$PYTHON" gpu_check/profile_update.py --kernel-only
}

stage_trainers() {
  if ((!DRY_RUN)) && ! "$PYTHON" -c "import gymnasium" 2>/dev/null; then
    SKIP_REASON="gymnasium is not importable: carry its wheels (.whl, gpu_check/README.md)"
  fi
  local algo
  for algo in dqn a2c reinforce; do
    step "$algo" 60 "$PYTHON" "examples/$algo.py" --device cuda --total-timesteps 3000 --eval-episodes 2 \
      --no-progress --run-name "gpu-check-$algo" --summary-json "$STAGE_DIR/$algo-cuda.json"
  done
}

run_stage() {
  STAGE=$1 STAGE_DIR=$RESULTS/$1 SKIP_REASON=""
  mkdir -p "$STAGE_DIR"
  [[ -n $BUILD_FAILED ]] && SKIP_REASON="the build stage failed in this call (see build/build.log, build/backend.log in the results)"
  "stage_${STAGE//-/_}"
  ((DRY_RUN)) || "$PYTHON" gpu_check/summary.py stage "$STAGE_DIR"
}

# ---- the dry run's check of the machinery ---------------------------------------------------

# Synthetic steps through step() and summary.py: each must be classified as expected, and the
# exit status of the aggregate must count only the failures.
selfcheck() {
  local RESULTS=$1/selfcheck DRY_RUN=0 got want
  run_synthetic() {
    STAGE=synthetic STAGE_DIR=$RESULTS/synthetic SKIP_REASON=""
    mkdir -p "$STAGE_DIR"
    step passes 5 true
    step fails 5 false
    step hangs 1 sleep 30                                   # time-out: exit 124
    BUDGET=$SECONDS RESERVE=0 step over_budget 60 true      # no time left: not run
    step declares 5 echo "NOT RUN: a part: declared in the log"
  } >/dev/null
  run_synthetic
  got=$("$PYTHON" gpu_check/summary.py statuses "$STAGE_DIR" | sort)
  want=$(printf '%s\n' "passes ok" "fails failed" "hangs failed" "over_budget not_run" "declares ok" \
         "declares: a part not_run" | sort)
  if [[ $got != "$want" ]]; then
    printf 'selfcheck: classification wrong\n--- got\n%s\n--- want\n%s\n' "$got" "$want"
    return 1
  fi
  if "$PYTHON" gpu_check/summary.py aggregate "$RESULTS" --expect synthetic >/dev/null; then
    echo "selfcheck: the aggregate of 2 failures exited 0"; return 1
  fi
  rm "$STAGE_DIR"/{fails,hangs}.step.tsv                  # ok and not-run rows alone: exit 0
  if ! "$PYTHON" gpu_check/summary.py aggregate "$RESULTS" --expect synthetic,never-ran >/dev/null; then
    echo "selfcheck: steps that did not run were counted as failures"; return 1
  fi
  echo "selfcheck: ok (exit 0, exit 1, time-out, budget skip, declared NOT RUN classified right)"
}

if ((DRY_RUN)); then
  if [[ -n $OUT_DIR ]]; then RESULTS=$OUT_DIR; else RESULTS=$(mktemp -d); trap 'rm -rf "$RESULTS"' EXIT; fi
  mkdir -p "$RESULTS"
  PLAN=$RESULTS/plan.txt
  : >"$PLAN"
  selfcheck "$RESULTS" || exit 1
  for s in "${ordered[@]}"; do run_stage "$s"; done
  "$PYTHON" gpu_check/dry_run.py "$PLAN" --python "$PYTHON"
  exit
fi

# ---- the real run -------------------------------------------------------------------------------

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9\n' '-')
RESULTS=${OUT_DIR:-bench/results/$(date -u +%Y-%m-%d)-${gpu:-unknown-gpu}}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: $0 ${ordered[*]} (budget ${BUDGET}s)"
  "$PYTHON" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n1)"
  echo "c++: $(command -v "${CXX:-c++}") $("${CXX:-c++}" --version 2>/dev/null | head -n1)"
  echo "compute-sanitizer: $(compute-sanitizer --version 2>/dev/null | tail -n1)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git (a copy of the working tree)')"
  "$PYTHON" -c "import gymnasium; print('gymnasium', gymnasium.__version__)" 2>/dev/null || echo "gymnasium: absent"
  echo
  nvidia-smi
} >"$RESULTS/env-$(date -u +%H%M%S).txt" 2>&1
echo "== results in $RESULTS"

for s in "${ordered[@]}"; do run_stage "$s"; done

expect=$(IFS=,; echo "${ordered[*]}")
"$PYTHON" gpu_check/summary.py aggregate "$RESULTS" --expect "$expect"
status=$?
if [[ -n $EXPORT ]]; then
  mkdir -p "$EXPORT"
  tar -czf "$EXPORT/gpu-check-$(date -u +%H%M%S).tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  cp "$RESULTS/summary.txt" "$RESULTS/summary.json" "$EXPORT/"
  echo "== exported to $EXPORT: $(ls "$EXPORT" | tr '\n' ' ')"
fi
exit "$status"
