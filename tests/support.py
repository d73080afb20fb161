"""Helpers shared by test modules (importable as `support`; a test must never import `conftest`,
whose module name several folders share)."""
from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTEGRATION_USER = "integration@sandbox.example"
PASSWORD = "sandbox"
PG = dict(host="127.0.0.1", port=5432, user="postgres")   # the machine's PostgreSQL (trust auth)


def airflow_cli() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def sqlite_steps(engine) -> list[int]:
    """A counter of SQLite VM steps (in hundreds) of every statement `engine` runs from now on:
    a deterministic measure of how much a query reads, for tests that must not time anything.
    Reset it with `steps[0] = 0`."""
    from sqlalchemy import event

    steps = [0]

    def count(conn, *_):
        conn.connection.dbapi_connection.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 100)

    event.listen(engine, "before_cursor_execute", count)
    return steps


def vault_conn(url: str, login: str = INTEGRATION_USER, password: str = PASSWORD) -> str:
    """An Airflow connection (JSON form, for AIRFLOW_CONN_* variables) to a sandbox vault."""
    return json.dumps({"conn_type": "veeva_vault", "host": url, "login": login, "password": password})


class PostgresDatabase:
    """A fresh, uniquely named PostgreSQL database, dropped on exit."""

    def __init__(self, prefix: str = "airflow_ci"):
        self.name = f"{prefix}_{secrets.token_hex(4)}"

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(dbname="postgres", **PG)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{self.name}"

    def __enter__(self) -> PostgresDatabase:
        self._admin(f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


class LedgerDatabase:
    """The ledger's own database and least-privilege role, made by scripts/postgres/init-ledger.sh
    (the docker-compose postgres service's init script) with unique names; dropped on exit.
    `airflow_db`: the Airflow metadata database the role must not reach."""

    def __init__(self, airflow_db: str):
        self.name = self.role = f"ledger_ci_{secrets.token_hex(4)}"
        self.password = secrets.token_hex(16)
        self.airflow_db = airflow_db

    @property
    def conn_uri(self) -> str:
        """As AIRFLOW_CONN_CLINICAL_CRM_LEDGER (docker-compose.yaml's form)."""
        return f"postgresql://{self.role}:{self.password}@{PG['host']}:{PG['port']}/{self.name}"

    def __enter__(self) -> LedgerDatabase:
        import os
        import subprocess

        env = dict(os.environ, PGHOST=PG["host"], PGPORT=str(PG["port"]), POSTGRES_USER=PG["user"],
                   POSTGRES_DB=self.airflow_db, LEDGER_DB_USER=self.role, LEDGER_DB_NAME=self.name,
                   LEDGER_DB_PASSWORD=self.password)
        result = subprocess.run(["bash", str(REPO / "scripts" / "postgres" / "init-ledger.sh")], env=env,
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            self.__exit__()
            raise RuntimeError(f"init-ledger.sh failed:\n{result.stdout}\n{result.stderr}")
        return self

    def __exit__(self, *exc) -> None:
        admin = PostgresDatabase()._admin
        admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        admin(f'DROP ROLE IF EXISTS "{self.role}"')
