#!/usr/bin/env bash
# Each distribution tests alone (issue 20.8): for every plugin (and template_sdk), a venv under
# build/isolated/venvs/<name> holding only that distribution, the diffstudio distributions it declares
# (dependencies + its `test` extra, transitively) and the third-party packages those require (plus torch, numpy,
# pytest); the venv is checked (nothing undeclared importable, `pip check` clean) and the tests run in it.
# Third-party packages are symlinks into .venv (nothing downloaded, torch never reinstalled); unchanged venvs are
# reused. Tests marked slow are left out unless --full. Proves: a distribution's tests need nothing its
# pyproject.toml does not declare. Details: scripts/test_isolated.py.
#
#   scripts/test-isolated.sh                          # every plugin and the SDK (what .ci/run does)
#   scripts/test-isolated.sh controlnet               # one plugin
#   scripts/test-isolated.sh --full flux2 -- -k vram  # slow tests too; pytest arguments after --
#   scripts/test-isolated.sh --list                   # each plugin's closure, nothing installed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/test_isolated.py "$@"
