#!/usr/bin/env bash
# The one script to run on a GPU machine (torch installed, no network):
#   bench/gpu_check.sh [OUTDIR]     (default bench/results/<date>-<gpu>/)
# 1. builds the extension in place with the CUDA kernels (FASTCLIP_FORCE_CUDA=1),
# 2. runs tests/test_cuda.py,
# 3. runs compute-sanitizer memcheck, racecheck and synccheck on a small driver
#    that exercises every kernel path (fused cooperative, the fallback, the
#    descriptor table, misaligned views, every dtype and norm type),
# 4. runs bench/bench_gpu.py and the update-step benchmark on cuda,
# 5. runs each trainer briefly with --device cuda (needs gymnasium: carry its wheels),
# 6. runs the rest of the test suite,
# and writes each step's log, env.txt and summary.{txt,json} (command, exit
# status, seconds of every step) to OUTDIR. Each step's time limit shrinks to
# what is left of GPU_CHECK_BUDGET_S (default 530 s), so the whole run fits in
# ~9 minutes. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
BUDGET=${GPU_CHECK_BUDGET_S:-530}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n1 | tr -c 'A-Za-z0-9\n' '-')
OUT=${1:-bench/results/$(date +%Y-%m-%d)-${gpu:-unknown-gpu}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/steps.tsv"

# step NAME MAX_SECONDS CMD...: runs CMD with a time limit, logs to OUT/NAME.log.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS)) limit start rc
  limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "== $name: SKIPPED, out of time budget" | tee "$OUT/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$*" >>"$OUT/steps.tsv"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >>"$OUT/steps.tsv"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: $0 $*"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l) files changed"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n1)"
  "$PYTHON" -c "import torch, platform; print('python:', platform.python_version()); print('torch:', torch.__version__, 'cuda:', torch.version.cuda)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvidia-smi
} >"$OUT/env.txt" 2>&1
head -n 8 "$OUT/env.txt"

export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step build 300 env FASTCLIP_FORCE_CUDA=1 "$PYTHON" setup.py build_ext --inplace
step backend 60 "$PYTHON" -c "import fastclip, fastclip._ops as o; print(fastclip.backend()); assert fastclip.backend() == 'cuda', o.LOAD_ERROR"
step test_cuda 200 "$PYTHON" -m pytest -q -rs tests/test_cuda.py

cat >"$OUT/sanitize_driver.py" <<'EOF'
"""Every CUDA kernel path once, small: run under compute-sanitizer by gpu_check.sh.
--big adds a set of > 4096 tiles (the two-barrier reduction)."""
import math, sys
import torch, fastclip

torch.manual_seed(0)
dev = "cuda"
dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
sets = {
    "mixed": [torch.randn(n, device=dev).to(dtypes[i % 4]) for i, n in enumerate([1, 7, 64, 8193, 40000, 3])],
    "misaligned": [torch.randn(n + 5, device=dev).to(dt)[1 + i % 3:1 + i % 3 + n]
                   for i, (dt, n) in enumerate([(torch.float16, 16390), (torch.float32, 8195), (torch.float64, 4099), (torch.bfloat16, 9)])],
    "table": [torch.randn(i % 50 + 1, device=dev) for i in range(1100)],
    "one_tile": [torch.randn(100, device=dev)],
    "strided": [torch.randn(40, 60, device=dev)[:, ::3], torch.randn(30, 20, device=dev).t()],
}
if "--big" in sys.argv:
    sets["big"] = [torch.randn(35_000_000, device=dev)]
for name, grads in sets.items():
    for p in (1.0, 2.0, math.inf, 3.0, 0.5):
        torch.ops.fastclip.total_norm(grads, p)
        torch.ops.fastclip.clip_grad_norm_([g.clone() for g in grads], 0.1, p)
    torch.ops.fastclip.scale_(grads, torch.tensor(0.5, device=dev))
    torch.ops.fastclip.scale_(grads, torch.tensor(1.0, dtype=torch.float64, device=dev))
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    fastclip.clip_grad_norm_(params, 0.5)
torch.cuda.synchronize()
print("sanitize driver: ok")
EOF

SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [[ -x "$SAN" ]]; then
  san=("$SAN" --error-exitcode 1 --target-processes all)
  step memcheck 120 "${san[@]}" --tool memcheck "$PYTHON" "$OUT/sanitize_driver.py" --big
  step memcheck_fallback 90 env FASTCLIP_CUDA_NO_COOP=1 "${san[@]}" --tool memcheck "$PYTHON" "$OUT/sanitize_driver.py"
  step racecheck 120 "${san[@]}" --tool racecheck "$PYTHON" "$OUT/sanitize_driver.py"
  step synccheck 90 "${san[@]}" --tool synccheck "$PYTHON" "$OUT/sanitize_driver.py"
else
  echo "compute-sanitizer not found (looked on PATH and at $SAN)" | tee "$OUT/memcheck.log"
  printf '%s\t%s\t%s\t%s\n' compute-sanitizer missing 0 "$SAN" >>"$OUT/steps.tsv"
fi

step bench_gpu 240 "$PYTHON" bench/bench_gpu.py --json "$OUT/bench_gpu.json"
cp "$OUT/bench_gpu.log" "$OUT/bench_gpu.txt" 2>/dev/null
step bench_update_cuda 90 "$PYTHON" -m bench.bench_update --device cuda --quick --json "$OUT/bench_update_cuda.json"
# The trainers need gymnasium, which the GPU image lacks: carry its wheels (and
# farama-notifications, cloudpickle) as the device README describes.
if "$PYTHON" -c "import gymnasium" 2>/dev/null; then
  step trainers_cuda 90 bash -c "for a in dqn a2c reinforce; do \"$PYTHON\" examples/\$a.py --device cuda \
    --total-timesteps 3000 --no-progress --summary-json \"$OUT/\$a-cuda.json\" || exit 1; done"
else
  echo "gymnasium not installed: trainers on --device cuda not run" | tee "$OUT/trainers_cuda.log"
  printf '%s\t%s\t%s\t%s\n' trainers_cuda no-gymnasium 0 "examples/*.py --device cuda" >>"$OUT/steps.tsv"
fi
step test_rest 240 "$PYTHON" -m pytest -q -rs tests --ignore=tests/test_cuda.py

"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = [dict(zip(("step", "exit", "seconds", "command"), line.split("\t", 3)))
         for line in (out / "steps.tsv").read_text().splitlines()]
ok = all(s["exit"] == "0" for s in steps)
summary = {"ok": ok, "env": (out / "env.txt").read_text().splitlines()[:8], "steps": steps}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
lines = [f"{s['step']:<20} exit {s['exit']:<8} {s['seconds']:>4}s  {s['command']}" for s in steps]
(out / "summary.txt").write_text("\n".join(summary["env"] + [""] + lines + ["", "ALL PASSED" if ok else "FAILURES"]) + "\n")
print((out / "summary.txt").read_text())
sys.exit(0 if ok else 1)
EOF
