#!/usr/bin/env bash
# Install (locked versions) with the test tools, lint, run the test suite. Tests marked slow (over ~20 s each on
# 2 cores) are left out unless --all is given first; CI (.ci/run) runs with --all. Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
ruff check .
if [ "${1:-}" = "--all" ]; then
    shift
    python -m pytest -q --durations=15 "$@"
else
    python -m pytest -q -m "not slow" "$@"
fi
