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
