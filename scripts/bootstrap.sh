#!/usr/bin/env bash
# Sets up .venv and builds fastclip into it; every README command runs this first.
#
# torch: if the system python already has one (a CUDA build on a GPU machine),
# the venv sees it (--system-site-packages) and it is used as is; otherwise the
# CPU build torch==2.13.0 is installed. Never an unpinned torch: that would
# download several GB of CUDA packages.
#
# Re-running is cheap: the dependencies are installed again only when
# requirements-dev.txt changed, and the extension is rebuilt only when one of
# its inputs changed (csrc/, setup.py, pyproject.toml, fastclip/_version.py,
# the torch build, the build switches and compiler variables); stamps in $VENV
# record what was done.
# When it does rebuild, objects kept in build/temp let ninja recompile only
# the sources that changed. FASTCLIP_REBUILD=1 forces a build.
#
#   bash scripts/bootstrap.sh           set up and build what is missing or stale
#   bash scripts/bootstrap.sh --check   only say whether the build is current
#                                       (exit 0) or would run (exit 1)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FASTCLIP_VENV:-.venv}
TORCH_PIN=${FASTCLIP_TORCH:-torch==2.13.0}
DEPS_STAMP=$VENV/.fastclip-deps.stamp
BUILD_STAMP=$VENV/.fastclip-build.stamp
BUILD_LOG=$VENV/fastclip-build.log
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[bootstrap] $*"; }

# pip warns about every unreachable extra index on some machines; not ours to fix.
quiet_pip_noise() { grep -v -e "is ignored: it is neither a file nor a directory" -e "^Requirement already satisfied" || true; }

# Runs "$@"; where stdout is not a terminal (CI logs), prints a line every 20 s
# so that a long step is not a silent minute.
with_heartbeat() {
  local label=$1; shift
  if [ -t 1 ]; then "$@"; return; fi
  local start=$SECONDS
  ( while sleep 20; do say "... still $label ($((SECONDS - start)) s)"; done ) &
  local ticker=$!
  local rc=0
  "$@" || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  return $rc
}

sha() { sha256sum | cut -d' ' -f1; }

# Everything the compiled extension depends on, hashed. torch's version.py names
# its version, CUDA version and git commit; reading it does not import torch.
build_inputs() {
  {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml fastclip/_version.py
    python - <<'EOF'
import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
print(sys.version, spec.origin)
with open(os.path.join(os.path.dirname(spec.origin), "version.py")) as f:
    print(f.read())
EOF
    for v in FASTCLIP_FORCE_CPU FASTCLIP_FORCE_CUDA FASTCLIP_CPU_ISA DEBUG CUDA_HOME CUDA_PATH \
             TORCH_CUDA_ARCH_LIST CC CXX CFLAGS CXXFLAGS LDFLAGS; do
      echo "$v=${!v-}"
    done
    echo "nvcc=$(command -v nvcc || true)"
  } | sha
}

# The inputs plus the built library itself (another venv or a manual build may
# have replaced it) plus fastclip being installed in this venv.
build_state() {
  local so
  so=$(ls fastclip/_C*.so 2>/dev/null | head -n1) || true
  [ -n "$so" ] || { echo none; return; }
  python -c "import importlib.metadata as m; m.version('fastclip')" 2>/dev/null || { echo none; return; }
  echo "$(build_inputs) $(sha256sum < "$so" | cut -d' ' -f1)"
}

if [ "${1:-}" = --check ]; then
  [ -x "$VENV/bin/python" ] || { say "no $VENV yet: everything would be set up"; exit 1; }
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  if [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$(build_state)" ]; then
    say "fastclip is up to date"; exit 0
  fi
  say "fastclip would be rebuilt"; exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    say "creating $VENV on top of the system torch"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  say "installing $TORCH_PIN (about 200 MB unpacked to 1 GB; a minute or two)"
  # stdout left alone: on a terminal pip draws its progress bar.
  with_heartbeat "installing torch" pip install "$TORCH_PIN" 2> >(quiet_pip_noise >&2)
fi

deps_want=$( (cat requirements-dev.txt; python -V) | sha)
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$deps_want" ]; then
  say "installing the build, test and example dependencies (requirements-dev.txt)"
  # With torch present none of these pulls another torch.
  with_heartbeat "installing dependencies" pip install -r requirements-dev.txt 2> >(quiet_pip_noise >&2) | quiet_pip_noise
  python -c "import setuptools, ninja, pybind11, numpy, gymnasium, pytest, hypothesis, tqdm, matplotlib" \
    || { say "dependency install failed" >&2; exit 1; }
  echo "$deps_want" > "$DEPS_STAMP"
fi

if [ "${FASTCLIP_REBUILD:-0}" != 1 ] && [ "$(cat "$BUILD_STAMP" 2>/dev/null)" = "$(build_state)" ]; then
  say "fastclip is up to date (no source, flag or torch change since the last build; FASTCLIP_REBUILD=1 forces one)"
else
  rm -f "$BUILD_STAMP"
  say "building fastclip against torch $(python -c 'import torch; print(torch.__version__)'); log: $BUILD_LOG"
  start=$SECONDS
  # -v makes pip pass the build's output through; keep ninja's "[n/N]" lines
  # (one per compiled source), shortened to the source's name.
  rc=0
  : >"$BUILD_LOG"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} pip install -v --no-build-isolation --no-deps -e . >"$BUILD_LOG" 2>&1 &
  pip_pid=$!
  ( while sleep 20; do say "  ... still building ($((SECONDS - start)) s)"; done ) &
  ticker=$!
  tail -n +1 --pid="$pip_pid" -f "$BUILD_LOG" | while IFS= read -r line; do
    if [[ $line =~ ^[[:space:]]*(\[[0-9]+/[0-9]+\]).*[[:space:]]-c[[:space:]]+([^[:space:]]+) ]]; then
      say "  ${BASH_REMATCH[1]} compiled ${BASH_REMATCH[2]#"$PWD"/} ($((SECONDS - start)) s)"
    fi
  done
  wait "$pip_pid" || rc=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null || true
  if [ $rc -ne 0 ]; then
    say "the build failed; the end of $BUILD_LOG:" >&2
    grep -v "is ignored: it is neither" "$BUILD_LOG" | tail -n 30 >&2
    exit 1
  fi
  say "built in $((SECONDS - start)) s"
  state=$(build_state)
  [ "$state" = none ] || echo "$state" > "$BUILD_STAMP"
fi

# Prints versions and the backend; fails if the extension does not load.
python -c "import sys, fastclip, fastclip.info; fastclip.info.main(); sys.exit(fastclip.backend() == 'python')" \
  || { say "the extension did not build or load (see above; FASTCLIP_REBUILD=1 rebuilds)" >&2; exit 1; }
