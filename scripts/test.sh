#!/usr/bin/env bash
# Command 2 of the README: set up and run the whole test suite (CI runs exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
mkdir -p test-artifacts
exec .venv/bin/python -m pytest -ra "$@"
