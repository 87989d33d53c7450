#!/usr/bin/env bash
# Lint and format checks (fast, a few seconds): ruff for Python (lint + format, settings in
# pyproject.toml) and clang-format for the C++/CUDA sources (.clang-format). Changes nothing;
# `scripts/lint.sh --fix` applies the fixes and the formatting instead.
# Tools come from the venv (requirements-dev.txt pins them): run `make setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
csrc=$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')
if [[ ${1:-} == --fix ]]; then
  "$BIN/ruff" check --fix .
  "$BIN/ruff" format .
  "$BIN/clang-format" -i $csrc
  exit 0
fi
status=0
"$BIN/ruff" check . || status=1
"$BIN/ruff" format --check . || { echo "lint: run scripts/lint.sh --fix to format"; status=1; }
"$BIN/clang-format" --dry-run --Werror $csrc || { echo "lint: run scripts/lint.sh --fix to format"; status=1; }
[[ $status -eq 0 ]] && echo "lint: ruff and clang-format clean"
exit $status
