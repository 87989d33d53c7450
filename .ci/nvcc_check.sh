#!/usr/bin/env bash
# Compile-checks the CUDA backend on a machine without a GPU (CI: 2 cores, nvcc,
# CPU-only torch): every csrc/cuda/*.cu with nvcc for sm_90 (the H200 the kernels
# are measured on; ptxas runs, so register and resource errors show) under
# torch's __CUDA_NO_HALF* / __CUDA_NO_BFLOAT16_CONVERSIONS__ macros, warnings as
# errors; and every glue file csrc/cuda/*.cpp with g++ -fsyntax-only against the
# installed torch's headers, as setup.py's CUDAExtension would compile it.
# Other architectures are not checked here: a GPU build compiles for its own
# (TORCH_CUDA_ARCH_LIST), and one more real architecture doubles the cost.
#
# About a minute on the 2-core CI machine (2m47s when it also built sm_80); a line per file as it finishes, and one
# every 20 s while any is still compiling. Skips (exit 0) when nvcc is not on
# PATH, or when FASTCLIP_SKIP_NVCC=1 (for local runs; CI keeps the check).
# Usage: .ci/nvcc_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${FASTCLIP_SKIP_NVCC:-0} == 1 ]]; then
  echo "nvcc_check: SKIPPED (FASTCLIP_SKIP_NVCC=1; CI runs it)"
  exit 0
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc_check: SKIPPED, nvcc is not on PATH (the CUDA sources were not compile-checked)"
  exit 0
fi
PYTHON=${PYTHON:-python}
# nvcc may be a wrapper script: ask it where its toolkit lives.
CUDA_INC=${CUDA_HOME:+$CUDA_HOME/include}
if [[ -z "$CUDA_INC" ]]; then
  CUDA_INC=$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n1)
  CUDA_INC=${CUDA_INC%/}
fi
[[ -f "$CUDA_INC/cuda_runtime_api.h" ]] || { echo "nvcc_check: cannot find the CUDA include dir (set CUDA_HOME)"; exit 1; }
TORCH_INC=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))") ||
  { echo "nvcc_check: '$PYTHON' cannot import torch (activate the venv or set PYTHON)"; exit 1; }

out=$(mktemp -d)
ticker=
trap 'rm -rf "$out"; [[ -z $ticker ]] || kill "$ticker" 2>/dev/null' EXIT
start=$SECONDS
declare -A name_of
launch() {  # launch NAME LOG CMD...: in the background, remembered by pid
  local name=$1 log=$2; shift 2
  "$@" >"$log" 2>&1 &
  name_of[$!]=$name
}

NO_HALF=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
         -D__CUDA_NO_HALF2_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__)
for cu in csrc/cuda/*.cu; do
  launch "$cu (nvcc, sm_90)" "$out/log.$(basename "$cu")" \
    nvcc -c -std=c++17 -O3 "${NO_HALF[@]}" -gencode arch=compute_90,code=sm_90 --Werror all-warnings \
    -Xcompiler -Wall,-Wextra "$cu" -o "$out/$(basename "$cu").o"
done
# System headers (torch, CUDA) via -isystem: their warnings are not ours.
glue=(g++ -fsyntax-only -std=c++20 -Wall -Wextra -Werror -DTORCH_API_INCLUDE_EXTENSION_H -DFASTCLIP_WITH_CUDA)
for d in $TORCH_INC "$CUDA_INC"; do glue+=(-isystem "$d"); done
for cpp in csrc/cuda/*.cpp; do
  launch "$cpp (g++ -fsyntax-only)" "$out/log.glue.$(basename "$cpp")" "${glue[@]}" "$cpp"
done
echo "nvcc_check: compiling ${#name_of[@]} files (about a minute on 2 cores; FASTCLIP_SKIP_NVCC=1 skips this locally)"
# One-second sleeps: a killed ticker leaves no long sleep holding the output open.
( while :; do for _ in {1..20}; do sleep 1; done; echo "nvcc_check: ... still compiling ($((SECONDS - start)) s)"; done ) &
ticker=$!

status=0
while ((${#name_of[@]})); do  # report each file as it finishes
  rc=0
  wait -n -p pid "${!name_of[@]}" || rc=$?
  if [[ $rc -eq 0 ]]; then
    echo "nvcc_check: ok      ${name_of[$pid]} ($((SECONDS - start)) s)"
  else
    echo "nvcc_check: FAILED  ${name_of[$pid]} ($((SECONDS - start)) s)"; status=1
  fi
  unset "name_of[$pid]"
done
if [[ $status -ne 0 ]]; then cat "$out"/log.*; fi
exit $status
