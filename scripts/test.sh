#!/usr/bin/env bash
# Install with the test tools, lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
ruff check .
python -m pytest -q "$@"
