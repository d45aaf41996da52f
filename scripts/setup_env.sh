#!/usr/bin/env bash
# Create or update the project virtual environment in .venv/ (idempotent).
#
# Installs the pinned CPU dependency set unless NDP_CUDA=1 is set, in which case the CUDA set
# from requirements-cuda.lock is used instead. Re-installs only when a lock file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
if [ "${NDP_CUDA:-0}" = "1" ]; then
    LOCKS=(requirements-cuda.lock requirements-nodeps.lock)
else
    LOCKS=(requirements.lock requirements-nodeps.lock)
fi
STAMP="$VENV/.ndp-installed"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi

want="$(cat "${LOCKS[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r "${LOCKS[0]}"
"$VENV/bin/python" -m pip install --quiet --no-deps -r "${LOCKS[1]}"
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
echo "$want" > "$STAMP"
