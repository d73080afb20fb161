#!/usr/bin/env bash
# The sync ledger's own database and role, apart from Airflow's metadata database: the ledger's
# connection can then read and write the ledger only, and no `airflow db` command touches it.
# Run once by the postgres image on an empty data volume (docker-compose.yaml mounts this file in
# /docker-entrypoint-initdb.d); on an existing volume run it by hand:
#   docker-compose exec -e LEDGER_DB_PASSWORD=... postgres bash /docker-entrypoint-initdb.d/init-ledger.sh
# tests/distributed/test_deployment.py runs it against the machine's PostgreSQL.
#
# Environment: LEDGER_DB_PASSWORD (required); LEDGER_DB_USER, LEDGER_DB_NAME [clinical_crm_ledger];
# POSTGRES_USER (a superuser to connect as) [postgres]; POSTGRES_DB (Airflow's database) [airflow];
# PGHOST / PGPORT as for psql.
set -euo pipefail
: "${LEDGER_DB_PASSWORD:?LEDGER_DB_PASSWORD is not set (scripts/make_env.sh writes it)}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v role="${LEDGER_DB_USER:-clinical_crm_ledger}" -v db="${LEDGER_DB_NAME:-clinical_crm_ledger}" \
  -v password="$LEDGER_DB_PASSWORD" -v airflow_db="${POSTGRES_DB:-airflow}" <<'SQL'
-- A login role that is nothing else: no superuser, no new databases or roles, no inherited grants.
CREATE ROLE :"role" LOGIN PASSWORD :'password' NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
-- Nor may it (or any role without an explicit grant) connect to Airflow's metadata database.
REVOKE CONNECT, TEMPORARY ON DATABASE :"airflow_db" FROM PUBLIC;
-- It owns its database and no other role may connect to it.
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
-- Alembic creates and migrates the ledger's tables in its public schema: the role owns that
-- schema (a template1 made before PostgreSQL 15 may give it to the superuser) and nobody else
-- creates anything in it.
\connect :"db"
ALTER SCHEMA public OWNER TO :"role";
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
SQL
echo "ledger database ${LEDGER_DB_NAME:-clinical_crm_ledger} owned by role ${LEDGER_DB_USER:-clinical_crm_ledger}"
