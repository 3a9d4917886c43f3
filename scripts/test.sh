#!/usr/bin/env bash
# The one command that sets everything up and runs the checks: lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system_packages.sh
bash scripts/setup_env.sh test
bash scripts/setup_mmseg_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy service export models
.venv/bin/python -m pytest "$@"
