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


def reports_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CRM_REPORTS_DIR", data_dir() / "reports"))
