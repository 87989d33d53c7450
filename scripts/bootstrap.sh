#!/usr/bin/env bash
# Sets up .venv and builds fastclip into it; every README command runs this first.
#
# torch: if the system python already has one (a CUDA build on a GPU machine),
# the venv sees it (--system-site-packages) and it is used as is; otherwise the
# CPU build torch==2.13.0 is installed. Never an unpinned torch: that would
# download several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FASTCLIP_VENV:-.venv}
TORCH_PIN=${FASTCLIP_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[bootstrap] creating $VENV on top of the system torch"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "[bootstrap] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  echo "[bootstrap] installing $TORCH_PIN"
  pip install -q "$TORCH_PIN"
fi
# With torch present none of these pulls another torch.
pip install -q -r requirements-dev.txt 2>&1 | grep -v "is ignored" || true
python -c "import ninja, pybind11, numpy, gymnasium, pytest, hypothesis, tqdm, matplotlib" \
  || { echo "[bootstrap] dependency install failed" >&2; exit 1; }

echo "[bootstrap] building fastclip (torch $(python -c 'import torch; print(torch.__version__)'))"
MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored" || true
python -m fastclip.info
[ "$(python -c 'import fastclip; print(fastclip.backend())' 2>/dev/null)" != python ] \
  || { echo "[bootstrap] the extension did not build or load" >&2; exit 1; }
