#!/usr/bin/env bash
# Create .venv with pip, install torch==2.13.0 (CPU build) when torch is missing, then every workspace member
# editable plus the dev requirements. Safe to re-run: a finished environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP="$PY -m pip --disable-pip-version-check"
if ! $PY -c "import torch" >/dev/null 2>&1; then
  $PIP install -q "torch==2.13.0"
fi
members=(-e core -e template_sdk)
for dir in plugins/*/; do
  case "$dir" in plugins/_template/) continue ;; esac
  [ -f "$dir/pyproject.toml" ] && members+=(-e "$dir")
done
stamp=.venv/.diffstudio-bootstrap
want="$(cat requirements-dev.txt core/pyproject.toml template_sdk/pyproject.toml plugins/*/pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  $PIP install -q -r requirements-dev.txt "${members[@]}"
  echo "$want" > "$stamp"
fi
