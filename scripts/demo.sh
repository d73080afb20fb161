#!/usr/bin/env bash
# Command 1 of the README: set up, start both sandbox vaults, run both DAGs over the last hourly
# windows through Airflow, print what moved, stop the vaults. Options go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
