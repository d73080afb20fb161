"""Where the project keeps its files and databases; every path can be moved by an env var."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_DATA_DIR", PROJECT_ROOT / "data"))


def connections_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_CONNECTIONS_DIR", PROJECT_ROOT / "include" / "connections"))


# The ledger's database as an Airflow connection, so a secrets backend (or the metadata DB, or an
# AIRFLOW_CONN_CLINICAL_CRM_LEDGER variable) can hold its password; without it, the environment.
LEDGER_CONN_ID = "clinical_crm_ledger"


def ledger_url() -> str:
    """SQLAlchemy URL of the sync ledger: the Airflow connection `clinical_crm_ledger` when it is
    defined, else $CLINICAL_CRM_LEDGER_URL, else data/ledger.db (the demo's SQLite file)."""
    return _ledger_connection_url() or os.environ.get(
        "CLINICAL_CRM_LEDGER_URL", f"sqlite:///{data_dir() / 'ledger.db'}")


def _ledger_connection_url() -> str | None:
    from airflow.exceptions import AirflowNotFoundException
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(LEDGER_CONN_ID)
    except AirflowNotFoundException:
        return None
    if conn.conn_type == "sqlite":  # get_uri() would quote the path's slashes
        return f"sqlite:///{conn.host or conn.schema}"
    scheme, rest = conn.get_uri().split("://", 1)
    # Airflow's `postgres` type; SQLAlchemy 2 knows only `postgresql` (psycopg2 is the pinned driver)
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgres", "postgresql") else f"{scheme}://{rest}"


# One storage root for everything the product writes besides the ledger: the staging, the GX
# projects and Data Docs, the run files and the alert state (engine/storage.py). A local folder by
# default (the data folder); any fsspec URL Airflow's ObjectStoragePath knows, e.g.
# s3://bucket/prefix (the Amazon provider's filesystem), reached through the Airflow connection
# $CLINICAL_CRM_STORAGE_CONN_ID when set (an `aws` connection: keys, and `endpoint_url` in its
# extra for an S3-compatible store), else the filesystem's own credential chain.


def storage_url() -> str:
    """The storage root: $CLINICAL_CRM_STORAGE_URL, default file://<data dir>."""
    url = os.environ.get("CLINICAL_CRM_STORAGE_URL") or str(data_dir())
    return url if "://" in url else f"file://{Path(url).absolute()}"  # a plain folder


def storage_conn_id() -> str | None:
    """The Airflow connection of the storage root's filesystem ($CLINICAL_CRM_STORAGE_CONN_ID)."""
    return os.environ.get("CLINICAL_CRM_STORAGE_CONN_ID") or None


def staging_url() -> str:
    """<root>/staging; $CLINICAL_CRM_STAGING_URL moves it (on the same filesystem connection)."""
    return os.environ.get("CLINICAL_CRM_STAGING_URL") or f"{storage_url().rstrip('/')}/staging"


def reports_url() -> str:
    """<root>/reports (GX projects and Data Docs, run files, alert state); the older
    $CLINICAL_CRM_REPORTS_DIR (a local folder) still moves it."""
    folder = os.environ.get("CLINICAL_CRM_REPORTS_DIR")
    if folder:
        return f"file://{Path(folder).absolute()}"
    return f"{storage_url().rstrip('/')}/reports"


def file_safe(name: str) -> str:
    """A name (e.g. a DAG run id) usable as one file or folder name in any store."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# Connect args for Airflow's own metadata DB when it is the embedded SQLite file (demo, UI, tests),
# named by AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS (and _ASYNC, for the api-server's async
# engine) = clinical_crm.settings.AIRFLOW_SQLITE_CONNECT_ARGS; see airflow_sqlite_env().
# Scheduler, dag-processor, api-server and the CLI all write that one file; sqlite3's default
# 5 s wait for its lock ends in "database is locked" on a busy 2-core machine. Not for PostgreSQL.
AIRFLOW_SQLITE_CONNECT_ARGS = {"timeout": 60}


def airflow_sqlite_env() -> dict[str, str]:
    """The environment variables that give Airflow's SQLite metadata DB the longer lock wait."""
    name = f"{__name__}.AIRFLOW_SQLITE_CONNECT_ARGS"
    return {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": name,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS_ASYNC": name}
