#!/usr/bin/env bash
# The main job on a fresh machine: install, then build an artifact from the built-in tiny GLM-4
# (random weights, generated on first use; no download) into ./demo, and run the slim runtime on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
glm-export build --precision fp32 -o demo --overwrite "$@"
cat demo/report.md
echo "--- glm-runtime on the artifact (random weights: the words are noise, the pipeline is real) ---"
glm-runtime generate demo --prompt "你好" --max-new-tokens 16 --temperature 0
