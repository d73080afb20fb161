#!/usr/bin/env bash
# Prepares an Airflow metadata database for the Clinical CRM connection DAGs.
# Used by the airflow-init service of docker-compose.yaml and by tests/distributed/test_celery.py,
# so the distributed test exercises exactly what a deployment runs. Safe to run again.
#
#   1. airflow db migrate
#   2. admin access (simple auth manager): writes the passwords file for the configured users
#   3. the Airflow connections of the two vaults (type veeva_vault), overwritten if present
#   4. the pools that cap concurrent calls to each vault (one per vault of every connection file)
#   5. the sync ledger's tables (Airflow connection clinical_crm_ledger, else CLINICAL_CRM_LEDGER_URL)
#
# Environment (all optional, defaults in brackets):
#   AIRFLOW_BIN                 airflow command                                   [airflow]
#   AIRFLOW_ADMIN_PASSWORD      password written for every simple-auth user; required when
#                               AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE is set (no default)
#   CTMS_VAULT_URL / CRM_VAULT_URL   base URLs of the vaults        [http://vault-ctms:8000, http://vault-crm:8000]
#   CTMS_CONN_ID / CRM_CONN_ID       Airflow connection ids         [vault_ctms_demo, vault_crm_demo]
#   VAULT_USERNAME / VAULT_PASSWORD  integration user               [integration@sandbox.example / sandbox]
#   CLINICAL_CRM_POOL_SLOTS     slots of each vault's pool (at least every load.concurrency)  [8]
#   CLINICAL_CRM_CONNECTIONS_DIR     the connection files (pools are made for their vaults)   [include/connections]
set -euo pipefail

AIRFLOW_BIN=${AIRFLOW_BIN:-airflow}
PYTHON_BIN=${PYTHON_BIN:-python}

echo "==> airflow db migrate"
"$AIRFLOW_BIN" db migrate

if [ -n "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}" ]; then
  echo "==> admin access: ${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
  : "${AIRFLOW_ADMIN_PASSWORD:?AIRFLOW_ADMIN_PASSWORD is not set (docker-compose: scripts/make_env.sh writes it)}"
  "$PYTHON_BIN" - <<'EOF'
import json, os
users = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
password = os.environ["AIRFLOW_ADMIN_PASSWORD"]
names = [entry.split(":")[0].strip() for entry in users.split(",") if entry.strip()]
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
with open(path, "w") as f:
    json.dump({name: password for name in names}, f)
EOF
fi

echo "==> Airflow connections of the two vaults"
connections_file=$(mktemp --suffix=.json)
trap 'rm -f "$connections_file"' EXIT
"$PYTHON_BIN" - "$connections_file" <<'EOF'
import json, os, sys
env = os.environ.get
def vault(url):
    return {
        "conn_type": "veeva_vault",
        "host": url,
        "login": env("VAULT_USERNAME", "integration@sandbox.example"),
        "password": env("VAULT_PASSWORD", "sandbox"),
        "extra": json.dumps({"api_version": env("VAULT_API_VERSION", "v25.2")}),
    }
connections = {
    env("CTMS_CONN_ID", "vault_ctms_demo"): vault(env("CTMS_VAULT_URL", "http://vault-ctms:8000")),
    env("CRM_CONN_ID", "vault_crm_demo"): vault(env("CRM_VAULT_URL", "http://vault-crm:8000")),
}
with open(sys.argv[1], "w") as f:
    json.dump(connections, f)
EOF
"$AIRFLOW_BIN" connections import --overwrite "$connections_file"

echo "==> pools (one per vault of every connection file)"
"$PYTHON_BIN" -m clinical_crm.airflow.dag_factory pools --slots "${CLINICAL_CRM_POOL_SLOTS:-8}"

echo "==> sync ledger tables"
"$PYTHON_BIN" -c 'from clinical_crm import settings; from clinical_crm.engine.ledger import Ledger; Ledger(settings.ledger_url())' \
  || echo "warning: could not create the ledger tables (they are created on first use)" >&2

echo "==> airflow-init done"
