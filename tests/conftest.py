"""Shared fixtures.

Airflow reads AIRFLOW_HOME and its database URL when it is first imported, so the environment of
the whole test session is set here, at import time, before any test imports Airflow: a temporary
AIRFLOW_HOME (SQLite metadata DB), the project's dags folder, and a temporary data dir for the
ledger, staging and reports. `airflow db migrate` runs once, only for tests that need it
(`airflow_db`).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from clinical_crm.settings import airflow_sqlite_env
from support import REPO, airflow_cli, vault_conn

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="clinical_crm_tests_"))
_AIRFLOW_HOME = _SESSION_DIR / "airflow_home"
_CONNECTIONS = _SESSION_DIR / "connections"
_AIRFLOW_HOME.mkdir()
_CONNECTIONS.mkdir()
shutil.copy(REPO / "include" / "connections" / "demo.yaml", _CONNECTIONS / "demo.yaml")

TEST_ENV = {
    "AIRFLOW_HOME": str(_AIRFLOW_HOME),
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    "CLINICAL_CRM_DATA_DIR": str(_SESSION_DIR / "data"),
    "CLINICAL_CRM_CONNECTIONS_DIR": str(_CONNECTIONS),
    "GX_ANALYTICS_ENABLED": "False",
}
for _key, _value in TEST_ENV.items():
    os.environ.setdefault(_key, _value)
if os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("sqlite"):
    for _key, _value in airflow_sqlite_env().items():
        os.environ.setdefault(_key, _value)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's Airflow metadata DB, migrated once."""
    subprocess.run([airflow_cli(), "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    from airflow import settings

    settings.configure_orm()
    return Path(os.environ["AIRFLOW_HOME"])


@pytest.fixture(scope="session")
def connections_dir() -> Path:
    """The session's connection files (a copy of the demo connection)."""
    return Path(os.environ["CLINICAL_CRM_CONNECTIONS_DIR"])


@pytest.fixture(scope="module")
def vaults(tmp_path_factory, monkeypatch_module):
    """The two sandbox vaults (demo seed) with the demo connection's Airflow connections set."""
    from vault_sandbox.testing import SandboxServer

    folder = tmp_path_factory.mktemp("vaults")
    with SandboxServer("ctms", folder / "ctms.db", seed="demo") as ctms, \
            SandboxServer("crm", folder / "crm.db", seed="demo") as crm:
        monkeypatch_module.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn(ctms.url))
        monkeypatch_module.setenv("AIRFLOW_CONN_VAULT_CRM_DEMO", vault_conn(crm.url))
        yield ctms, crm


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def demo_cfg():
    from clinical_crm.config import load_connection

    return load_connection(REPO / "include" / "connections" / "demo.yaml")
