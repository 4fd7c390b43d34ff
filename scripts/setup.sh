#!/usr/bin/env bash
# Create .venv and install glm-runtime + glm-export (and the test tools with --test), offline-friendly.
# torch is pinned to the CPU wheel this project is developed and tested with; on a GPU host install the
# CUDA build of torch>=2.13 first and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python -m pip install --quiet -e ./runtime -e ".${extras}"
