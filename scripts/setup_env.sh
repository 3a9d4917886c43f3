#!/usr/bin/env bash
# Create (or reuse) the one environment in .venv/ at the repository root.
# Reinstalls only when a requirements file changed. Usage: scripts/setup_env.sh [serve|export|test]
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-test}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=".venv/.segserve-$profile.sha256"
want=$(cat requirements/*.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_env: installing requirements/$profile.txt into .venv" >&2
  .venv/bin/pip install -q -r "requirements/$profile.txt" -c requirements/constraints.txt
  echo "$want" > "$stamp"
fi
