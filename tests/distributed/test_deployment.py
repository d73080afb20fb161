"""What the docker-compose init leaves in the databases, on the machine's PostgreSQL (no Docker):
`scripts/airflow_init.sh` (the airflow-init service) with a Fernet key stores the vault
connections encrypted, and the ledger lives in its own database, created by
`scripts/postgres/init-ledger.sh` (the postgres service's init script) for a role that cannot
reach Airflow's metadata database; the ledger is found through the Airflow connection
`clinical_crm_ledger`, as docker-compose.yaml gives it.
"""
from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest

from airflow_cluster import AirflowCluster, LedgerDatabase, PostgresDatabase
from support import PG

REPO = Path(__file__).resolve().parents[2]
VAULT_CONNECTIONS = ("vault_ctms_demo", "vault_crm_demo")


def _connect(dbname: str, user: str = PG["user"]):
    import psycopg2

    try:
        return psycopg2.connect(dbname=dbname, host=PG["host"], port=PG["port"], user=user, connect_timeout=5)
    except psycopg2.OperationalError as error:
        if dbname == "postgres":
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is needed: {error}")
        raise


def _rows(dbname: str, sql: str, params=()) -> list[tuple]:
    conn = _connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


def _columns_holding(dbname: str, needle: str) -> list[str]:
    """Every table.column of the database's public schema whose text contains `needle`."""
    import psycopg2.sql as sql

    columns = _rows(dbname, "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
                            "'public' AND data_type IN ('text', 'character varying', 'json', 'jsonb', 'bytea')")
    conn = _connect(dbname)
    found = []
    try:
        with conn.cursor() as cur:
            for table, column in columns:
                cur.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}::text LIKE %s").format(
                    sql.Identifier(table), sql.Identifier(column)), (f"%{needle}%",))
                if cur.fetchone()[0]:
                    found.append(f"{table}.{column}")
    finally:
        conn.close()
    return found


def test_init_stores_the_vault_passwords_encrypted_and_the_ledger_apart(tmp_path):
    from cryptography.fernet import Fernet

    _connect("postgres").close()
    vault_password = f"vault-{secrets.token_hex(12)}"  # unique: found only where it was stored
    connections = tmp_path / "connections"
    shutil.copytree(REPO / "include" / "connections", connections)
    home = tmp_path / "airflow"
    home.mkdir()
    with PostgresDatabase() as airflow_db, LedgerDatabase(airflow_db.name) as ledger:
        cluster = AirflowCluster(home, airflow_db.url, 13, REPO / "dags", {
            "AIRFLOW_CONN_CLINICAL_CRM_LEDGER": ledger.conn_uri,  # as docker-compose.yaml
            "CLINICAL_CRM_CONNECTIONS_DIR": str(connections),
            "CLINICAL_CRM_DATA_DIR": str(tmp_path / "data"),
            "VAULT_PASSWORD": vault_password,
        })
        cluster.env.pop("CLINICAL_CRM_LEDGER_URL", None)
        cluster.init()

        rows = _rows(airflow_db.name, "SELECT conn_id, password, is_encrypted, is_extra_encrypted FROM connection "
                                      "WHERE conn_id = ANY(%s)", (list(VAULT_CONNECTIONS),))
        assert sorted(r[0] for r in rows) == sorted(VAULT_CONNECTIONS)
        fernet = Fernet(cluster.env["AIRFLOW__CORE__FERNET_KEY"])
        for conn_id, password, is_encrypted, is_extra_encrypted in rows:
            assert is_encrypted and is_extra_encrypted, conn_id
            assert password != vault_password and fernet.decrypt(password.encode()).decode() == vault_password
        # nowhere in plain text: not in the connection table, not in any other column of any table
        assert _columns_holding(airflow_db.name, vault_password) == []
        assert _columns_holding(ledger.name, vault_password) == []

        # The init created the ledger's tables in the ledger's database, owned by its role; Airflow's
        # database holds none of them.
        ledger_tables = {t for t, in _rows(ledger.name, "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                                        "AND tableowner = %s", (ledger.role,))}
        assert {"runs", "record_outcomes", "quarantine", "clinical_crm_ledger_version"} <= ledger_tables, ledger_tables
        airflow_tables = {t for t, in _rows(airflow_db.name, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert "dag_run" in airflow_tables and not {"runs", "record_outcomes", "quarantine"} & airflow_tables


def test_the_ledger_role_reaches_its_database_only(tmp_path):
    import psycopg2

    with PostgresDatabase() as airflow_db, LedgerDatabase(airflow_db.name) as ledger:
        conn = _connect(ledger.name, user=ledger.role)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user")
                assert cur.fetchone() == (False, False, False)
                cur.execute("CREATE TABLE probe (x int)")  # its own schema: Alembic can migrate
        finally:
            conn.close()
        with pytest.raises(psycopg2.OperationalError, match="CONNECT privilege"):
            _connect(airflow_db.name, user=ledger.role)


def test_the_ledger_url_comes_from_the_airflow_connection(monkeypatch, tmp_path):
    from clinical_crm import settings

    monkeypatch.delenv("AIRFLOW_CONN_CLINICAL_CRM_LEDGER", raising=False)
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", "sqlite:////tmp/from-the-environment.db")
    assert settings.ledger_url() == "sqlite:////tmp/from-the-environment.db"  # the local default
    monkeypatch.setenv("AIRFLOW_CONN_CLINICAL_CRM_LEDGER",
                       '{"conn_type": "postgres", "host": "db.example.test", "port": 5432, "login": "ledger", '
                       '"password": "p@ss word", "schema": "clinical_crm_ledger", "extra": {"sslmode": "require"}}')
    from sqlalchemy.engine import make_url

    url = make_url(settings.ledger_url())
    assert (url.drivername, url.host, url.port, url.username, url.password, url.database, dict(url.query)) == (
        "postgresql+psycopg2", "db.example.test", 5432, "ledger", "p@ss word", "clinical_crm_ledger",
        {"sslmode": "require"})
    monkeypatch.setenv("AIRFLOW_CONN_CLINICAL_CRM_LEDGER", f"sqlite:///{tmp_path}/ledger.db")
    assert settings.ledger_url() == f"sqlite:///{tmp_path}/ledger.db"
