#!/usr/bin/env bash
# Runs a command only if its inputs changed since it last succeeded here.
#   bash scripts/if_changed.sh NAME 'SHELL SNIPPET PRINTING THE INPUTS' CMD [ARGS...]
# The snippet's output (file hashes, tool versions...) is hashed; the hash of the
# last successful run is kept in .venv/.NAME.stamp. FASTCLIP_REBUILD=1 runs anyway.
# A fresh clone (CI) has no stamp, so there the command always runs.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1 inputs=$2; shift 2
stamp=${FASTCLIP_VENV:-.venv}/.$name.stamp
want=$(bash -c "$inputs" 2>&1 | sha256sum | cut -d' ' -f1)
if [ "${FASTCLIP_REBUILD:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "[$name] skipped: nothing it checks changed since it last passed (FASTCLIP_REBUILD=1 runs it)"
  exit 0
fi
rm -f "$stamp"
"$@"
echo "$want" > "$stamp"
