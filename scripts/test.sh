#!/usr/bin/env bash
# Command 2 of the README: set up, lint and type-check, then run the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# both pinned sets installed together must be consistent (the image runs pip check on the runtime set)
.venv/bin/python -m pip check
# the lint rules and the type checker's settings: pyproject.toml, [tool.ruff] and [tool.mypy]
echo "==> ruff check"
.venv/bin/ruff check .
echo "==> mypy (include/clinical_crm)"
.venv/bin/mypy
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -ra "$@"
