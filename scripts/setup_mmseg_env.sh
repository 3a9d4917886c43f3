#!/usr/bin/env bash
# Create (or reuse) .venv-mmseg/: mmsegmentation 1.2.2, the oracle tests/integration/test_mmseg_real.py
# runs as a subprocess. Separate from .venv because its pins clash with ours. Reinstalls only when
# requirements/mmseg.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv-mmseg/bin/python ]; then
  "$python" -m venv .venv-mmseg
  .venv-mmseg/bin/pip install -q --upgrade pip
fi
stamp=".venv-mmseg/.segserve-mmseg.sha256"
want=$(sha256sum requirements/mmseg.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup_mmseg_env: installing requirements/mmseg.txt into .venv-mmseg" >&2
  .venv-mmseg/bin/pip install -q -r requirements/mmseg.txt
  echo "$want" > "$stamp"
fi
