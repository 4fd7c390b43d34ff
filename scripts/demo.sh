#!/usr/bin/env bash
# The main job on a fresh machine: install, then build an artifact from the built-in tiny GLM-4
# (random weights, generated on first use; no download) into ./demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
glm-export build --precision fp32 -o demo --overwrite "$@"
cat demo/report.md
