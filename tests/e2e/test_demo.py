"""The demo (README command 1) runs the DAGs through a real scheduler: backfills of the last
three hourly windows, every run recorded by Airflow with its real start (not its logical date),
and the per-run table with the path of each run's quarantine CSV. Everything it started is gone
afterwards."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import datetime, timezone

import psutil
import pytest

from support import REPO
from vault_sandbox.testing import free_port

pytestmark = pytest.mark.slow


def test_demo_runs_backfills_through_the_scheduler(tmp_path):
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    # a user's shell: none of the test session's Airflow or project settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CLINICAL_CRM_"))}
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--data", str(tmp_path / "data"),
                             "--ctms-port", str(free_port()), "--crm-port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with sqlite3.connect(tmp_path / "data" / "airflow" / "airflow.db") as db:
        runs = db.execute("SELECT dag_id, run_type, state, start_date, logical_date FROM dag_run").fetchall()
    assert sorted(dag for dag, *_ in runs) == ["crm_to_ctms__demo"] * 3 + ["ctms_to_crm__demo"] * 3
    assert all(run_type == "backfill" and state == "success" for _, run_type, state, *_ in runs)
    # started when the scheduler ran them, not stamped with their logical date
    assert all(datetime.fromisoformat(start) > started > datetime.fromisoformat(logical)
               for *_, start, logical in runs)
    quarantine_lines = [line for line in result.stdout.splitlines() if "quarantined records: " in line]
    assert len(quarantine_lines) == 6
    assert all(line.strip().split(": ", 1)[1].endswith(".quarantine.csv") for line in quarantine_lines)
    assert "state: success" in result.stdout and "[6/6]" in result.stdout
    assert "stopping Airflow and the sandbox vaults" in result.stdout
    home = str(tmp_path / "data" / "airflow")
    assert not [p.pid for p in psutil.process_iter() if _environ(p).get("AIRFLOW_HOME") == home]


def _environ(process) -> dict:
    try:
        return process.environ()
    except (psutil.Error, OSError):
        return {}


def test_demo_sizes_the_executor_to_the_machine(tmp_path, monkeypatch):
    """The LocalExecutor starts PARALLELISM task processes (Airflow's default 32): one per core."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    for cores, expected in ((2, "2"), (8, "8"), (1, "2"), (None, "2")):
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        env = demo.demo_environment(tmp_path, "http://ctms", "http://crm", 8080)
        assert env["AIRFLOW__CORE__PARALLELISM"] == expected, cores
    assert "AIRFLOW__CORE__PARALLELISM" in (REPO / "scripts" / "ui.sh").read_text()  # airflow standalone too
