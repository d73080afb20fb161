"""Where the project keeps its files and databases; every path can be moved by an env var."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_DATA_DIR", PROJECT_ROOT / "data"))


def connections_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_CONNECTIONS_DIR", PROJECT_ROOT / "include" / "connections"))


def ledger_url() -> str:
    return os.environ.get("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{data_dir() / 'ledger.db'}")


def staging_url() -> str:
    return os.environ.get("CLINICAL_CRM_STAGING_URL", f"file://{data_dir() / 'staging'}")


def file_safe(name: str) -> str:
    """A name (e.g. a DAG run id) usable as one file or folder name in any store."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def reports_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_REPORTS_DIR", data_dir() / "reports"))


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
