#!/usr/bin/env bash
# Create .venv and install glm-runtime + glm-export (and the test tools with --test) at the exact versions of
# requirements/app.lock (or requirements/test.lock), hash-checked, so every machine of this kind gets the same
# numbers. The packages' own ranges stay open (pip install glm-runtime resolves alone); `bash scripts/lock.sh`
# refreshes the locks. torch is the CPU wheel 2.13.0+cpu; on a GPU host install a CUDA build of torch>=2.13 into
# .venv first and it is kept (the lock's torch is then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
lock=requirements/app.lock
extras=""
if [ "${1:-}" = "--test" ]; then lock=requirements/test.lock; extras="[test]"; fi
req="$lock"
torch_now=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [ -n "$torch_now" ] && [ "$torch_now" != "2.13.0+cpu" ]; then
    echo "keeping the installed torch $torch_now (the lock pins 2.13.0+cpu)"
    req=$(mktemp); trap 'rm -f "$req"' EXIT
    # drop the torch entry (its line and the indented hash lines after it)
    awk '/^torch==/{skip=1; next} skip && /^[ \t]/{next} {skip=0; print}' "$lock" > "$req"
fi
python -m pip install --quiet --require-hashes --only-binary :all: -r "$req"
# The two projects themselves, editable, with nothing resolved beyond the lock (setuptools comes from it).
python -m pip install --quiet --no-deps --no-build-isolation -e ./runtime -e ".${extras}"
python -m pip check >/dev/null || { python -m pip check; exit 1; }
