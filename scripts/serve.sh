#!/usr/bin/env bash
# The one command that sets everything up and runs the service on this machine's CPU:
# creates or reuses .venv/, exports a random-init SegFormer-B0 into model_repository/ when it holds
# no bundle (masks from it are meaningless; the log, /models and the page say so), then serves
# http://localhost:8000 (the web page at /), on loopback only: HOST=0.0.0.0 opens it to the network
# (set SEGSERVE_API_KEY then). Settings: SEGSERVE_* environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh export
repository="${SEGSERVE_MODEL_REPOSITORY:-model_repository}"
if ! compgen -G "$repository/*/segserve.json" >/dev/null; then
  echo "serve: no bundle in $repository/: exporting an UNTRAINED (random-init) SegFormer-B0" >&2
  .venv/bin/python -m export --model segformer-b0 --random-init --dataset ade20k \
    --out "$repository/segformer-b0"
fi
export SEGSERVE_MODEL_REPOSITORY="$repository"
exec .venv/bin/python -m service --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
