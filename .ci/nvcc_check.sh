#!/usr/bin/env bash
# Compile-checks the CUDA backend on a machine without a GPU (CI: 2 cores, nvcc,
# CPU-only torch): every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 under
# torch's __CUDA_NO_HALF* / __CUDA_NO_BFLOAT16_CONVERSIONS__ macros, warnings as
# errors; and every glue file csrc/cuda/*.cpp with g++ -fsyntax-only against
# the installed torch's headers, as setup.py's CUDAExtension would compile it.
# Skips (exit 0) when nvcc is not on PATH. Usage: .ci/nvcc_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

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
trap 'rm -rf "$out"' EXIT
NO_HALF=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
         -D__CUDA_NO_HALF2_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__)
pids=() names=()
for cu in csrc/cuda/*.cu; do
  # Both architectures in one nvcc run: the host-side passes are shared.
  cmd=(nvcc -c -std=c++17 -O3 "${NO_HALF[@]}" -gencode arch=compute_80,code=sm_80
       -gencode arch=compute_90,code=sm_90 --Werror all-warnings -Xcompiler -Wall,-Wextra
       "$cu" -o "$out/$(basename "$cu").o")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" >"$out/log.$(basename "$cu")" 2>&1 &
  pids+=($!) names+=("$cu (sm_80, sm_90)")
done
# System headers (torch, CUDA) via -isystem: their warnings are not ours.
glue=(g++ -fsyntax-only -std=c++20 -Wall -Wextra -Werror -DTORCH_API_INCLUDE_EXTENSION_H
      -DFASTCLIP_WITH_CUDA)
for d in $TORCH_INC "$CUDA_INC"; do glue+=(-isystem "$d"); done
for cpp in csrc/cuda/*.cpp; do
  echo "+ ${glue[*]} $cpp"
  "${glue[@]}" "$cpp" >"$out/log.glue.$(basename "$cpp")" 2>&1 &
  pids+=($!) names+=("$cpp (g++ -fsyntax-only)")
done

status=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    echo "ok      ${names[$i]}"
  else
    echo "FAILED  ${names[$i]}"; status=1
  fi
done
if [[ $status -ne 0 ]]; then cat "$out"/log.*; fi
exit $status
