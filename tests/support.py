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


# ---------------------------------------------------------------- a local S3-compatible server

S3_KEY, S3_SECRET, S3_REGION = "testing", "testing", "us-east-1"  # moto accepts any credentials
STORAGE_CONN_ID = "clinical_crm_storage"


def storage_conn(endpoint: str) -> str:
    """An Airflow `aws` connection (JSON form, for AIRFLOW_CONN_* variables) to an S3-compatible
    endpoint: what CLINICAL_CRM_STORAGE_CONN_ID names; the Amazon provider's filesystem reads
    `endpoint_url` from its extra."""
    return json.dumps({"conn_type": "aws", "login": S3_KEY, "password": S3_SECRET,
                       "extra": {"endpoint_url": endpoint, "region_name": S3_REGION}})


class S3Server:
    """moto's S3 server in this process (a thread) on a free loopback port; stopped on exit."""

    def __init__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                            region_name=S3_REGION)

    def new_bucket(self) -> str:
        bucket = f"clinical-crm-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
