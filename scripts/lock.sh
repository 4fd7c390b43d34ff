#!/usr/bin/env bash
# Refresh requirements/app.lock and requirements/test.lock (exact versions + sha256) from pyproject.toml and
# runtime/pyproject.toml, for CPython 3.11 on x86-64 Linux (the machines the README's commands and CI run on).
# The packages themselves keep version ranges; the locks only pin the two README commands and CI.
# Pass --upgrade to move every pin to the newest allowed release (default: keep existing pins where possible).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
command -v "$UV" >/dev/null || { python3 -m pip install --quiet "uv==0.13.9" && UV="python3 -m uv"; }
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet
        --find-links /opt/wheels --no-emit-package glm-export --no-emit-package glm-runtime
        --no-emit-find-links --no-header --annotation-style line "$@")

$UV pip compile "${common[@]}" requirements/app.in -o requirements/app.lock
$UV pip compile "${common[@]}" requirements/test.in -o requirements/test.lock
echo "requirements/app.lock: $(grep -c "==" requirements/app.lock) pins; requirements/test.lock: $(grep -c "==" requirements/test.lock) pins"
