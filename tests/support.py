"""Helpers shared by test modules (importable as `support`; a test must never import `conftest`,
whose module name several folders share)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTEGRATION_USER = "integration@sandbox.example"
PASSWORD = "sandbox"


def airflow_cli() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def vault_conn(url: str, login: str = INTEGRATION_USER, password: str = PASSWORD) -> str:
    """An Airflow connection (JSON form, for AIRFLOW_CONN_* variables) to a sandbox vault."""
    return json.dumps({"conn_type": "veeva_vault", "host": url, "login": login, "password": password})
