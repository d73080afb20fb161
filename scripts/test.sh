#!/usr/bin/env bash
# Command 2 of the README: set up and run the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# both pinned sets installed together must be consistent (the image runs pip check on the runtime set)
.venv/bin/python -m pip check
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -ra "$@"
