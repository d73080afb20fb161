#!/usr/bin/env bash
# Opens the Airflow UI (http://127.0.0.1:8080) on the demo's state: Airflow metadata, ledger and
# reports under data/. Also starts the two sandbox vaults on the demo's ports (their data kept), so
# DAGs can be triggered from the UI. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
root=$(pwd)
export AIRFLOW_HOME="$root/data/airflow" CLINICAL_CRM_DATA_DIR="$root/data"
export AIRFLOW__CORE__DAGS_FOLDER="$root/dags" AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=True
# standalone's LocalExecutor starts PARALLELISM task processes (default 32): one per core, at least two
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-$(( $(nproc) > 2 ? $(nproc) : 2 ))}"
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=clinical_crm.settings.AIRFLOW_SQLITE_CONNECT_ARGS
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC=clinical_crm.settings.AIRFLOW_SQLITE_CONNECT_ARGS
export PATH="$root/.venv/bin:$PATH"
[ -f "$AIRFLOW_HOME/airflow.db" ] || { echo "Run the demo first: bash scripts/demo.sh" >&2; exit 1; }
mkdir -p data/sandbox
python -m vault_sandbox serve --app ctms --port 8701 --db data/sandbox/ctms.db --seed demo >data/sandbox/ctms.log 2>&1 &
python -m vault_sandbox serve --app crm --port 8702 --db data/sandbox/crm.db --seed demo >data/sandbox/crm.log 2>&1 &
trap 'kill $(jobs -p) 2>/dev/null' EXIT
echo "Airflow UI: http://127.0.0.1:${AIRFLOW_PORT:-8080}  (Browse > Clinical CRM connection for the data engineers' page)"
airflow standalone
