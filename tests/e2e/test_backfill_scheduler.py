"""`airflow backfill create` over three windows, driven by a real scheduler.

A separate Airflow (own AIRFLOW_HOME, a fresh PostgreSQL database, LocalExecutor) runs as
subprocesses: api-server (the Execution API the task workers talk to), dag-processor and
scheduler, all on 127.0.0.1. (On SQLite, `airflow backfill create` failed now and then with
"database is locked" while the scheduler wrote: SQLite refuses at once, without waiting, a
transaction that read and then writes while another process holds the write lock.)
The backfill must complete, record three contiguous successful windows in the ledger, and leave
every good Clinical Activity modified in those windows in the CRM vault.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.vault.client import VaultClient
from clinical_crm.config import load_connection
from clinical_crm.engine.ledger import Ledger
from vault_sandbox.testing import free_port

from sqlalchemy import create_engine, text

from clinical_crm.settings import airflow_sqlite_env
from support import REPO, PostgresDatabase, airflow_cli, vault_conn

pytestmark = pytest.mark.slow
DAG_ID = "ctms_to_crm__demo"
LOOKBACK = timedelta(minutes=10)


def _sql(engine, query, **params):
    with engine.connect() as conn:
        return conn.execute(text(query), params).all()


def _wait(predicate, timeout: float, what: str, processes=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in processes:
            assert p.poll() is None, f"{p.args[1]} exited while waiting for {what}"
        result = predicate()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def metadata_db():
    with PostgresDatabase("airflow_backfill") as database:
        engine = create_engine(database.url)
        yield database.url, engine
        engine.dispose()


@pytest.fixture
def airflow_env(tmp_path, vaults, metadata_db):
    ctms, crm = vaults
    db_url, engine = metadata_db
    home = tmp_path / "airflow"
    connections = tmp_path / "connections"
    home.mkdir()
    connections.mkdir()
    shutil.copy(REPO / "include" / "connections" / "demo.yaml", connections / "demo.yaml")
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": "clinical-crm-backfill-test",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "CLINICAL_CRM_DATA_DIR": str(tmp_path / "data"),
        "CLINICAL_CRM_CONNECTIONS_DIR": str(connections),
        "AIRFLOW_CONN_VAULT_CTMS_DEMO": vault_conn(ctms.url),
        "AIRFLOW_CONN_VAULT_CRM_DEMO": vault_conn(crm.url),
    }
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    for key in airflow_sqlite_env():  # SQLite's lock wait: not an argument PostgreSQL takes
        env.pop(key, None)
    subprocess.run([airflow_cli(), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    # the per-vault pools, created by the project's CLI
    made = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "clinical_crm.airflow.dag_factory", "pools"],
                          env=env, check=True, capture_output=True, text=True, timeout=120)
    assert set(made.stdout.split()) == {"vault_ctms_demo", "vault_crm_demo"}
    return env, engine, tmp_path


@pytest.fixture
def airflow_processes(airflow_env):
    env, db, folder = airflow_env
    processes = []
    try:
        for command in (["api-server"], ["dag-processor"], ["scheduler"]):
            log = open(folder / f"{command[0]}.log", "wb")
            processes.append(subprocess.Popen([airflow_cli(), *command], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        yield processes
    finally:
        for p in processes:  # only the process groups started here
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_backfill_three_windows_with_a_real_scheduler(airflow_env, airflow_processes, vaults):
    env, db, folder = airflow_env
    _wait(lambda: _sql(db, "SELECT 1 FROM serialized_dag WHERE dag_id = :dag", dag=DAG_ID), 120,
          "the dag-processor to serialize the DAG", airflow_processes)
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    first, last = hour - timedelta(hours=4), hour - timedelta(hours=2)  # logical dates of 3 hourly windows
    result = subprocess.run([airflow_cli(), "backfill", "create", "--dag-id", DAG_ID,
                             "--from-date", first.isoformat(), "--to-date", last.isoformat(),
                             "--max-active-runs", "1"],
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]

    def backfill_runs():
        runs = _sql(db, "SELECT run_id, state FROM dag_run WHERE dag_id = :dag AND run_type = 'backfill'", dag=DAG_ID)
        return runs if len(runs) == 3 and all(state in ("success", "failed") for _, state in runs) else None

    runs = _wait(backfill_runs, 240, "three backfill runs to finish", airflow_processes)
    assert all(state == "success" for _, state in runs), (runs, (folder / "scheduler.log").read_text()[-3000:])

    # The ledger: three successful, contiguous windows.
    ledger = Ledger(f"sqlite:///{folder / 'data' / 'ledger.db'}")
    windows = sorted((r["window_start"], r["window_end"]) for r in ledger.recent_runs("demo", limit=50)
                     if r["dag_run_id"].startswith("backfill__") and r["state"] == "success")
    assert len(windows) == 3
    starts = [datetime.fromisoformat(s) for s, _ in windows]
    ends = [datetime.fromisoformat(e) for _, e in windows]
    # A data-interval timetable's run for logical date L covers [L, L + 1h]. The first run of a
    # connection reaches back to the schedule's start date (nothing before it is skipped), unless
    # the scheduler's own latest-interval run succeeded first (catchup is off; it races the backfill).
    start_date = load_connection(REPO / "include" / "connections" / "demo.yaml").schedule.start_date
    assert starts[0] in (start_date - LOOKBACK, first - LOOKBACK)
    assert starts[1] == first + timedelta(hours=1) - LOOKBACK
    assert ends[-1] == last + timedelta(hours=1)
    for previous_end, start in zip(ends, starts[1:]):
        assert start <= previous_end  # no gap between windows

    # The target: every Clinical Activity modified in the backfilled range whose Person matches
    # exactly one Account is a Vault Clinical Interaction in CRM.
    ctms_server, crm_server = vaults
    ctms = VaultClient(ctms_server.url, "integration@sandbox.example", "sandbox")
    crm = VaultClient(crm_server.url, "integration@sandbox.example", "sandbox")
    try:
        quote = lambda d: "'" + d.strftime("%Y-%m-%dT%H:%M:%S.000Z") + "'"  # noqa: E731
        activities = [r for p in ctms.query(
            "SELECT id, global_id__sys, person__vr.veeva_network_id__c FROM crm_activity__v "
            "WHERE object_type__vr.api_name__v = 'clinical_activity__v' "
            f"AND modified_date__v > {quote(starts[0])} AND modified_date__v <= {quote(ends[-1])}")
            for r in p.records]
        assert activities, "the demo seed has activities in the last four hours"
        accounts: dict[str, int] = {}
        for page in crm.query("SELECT id, veeva_network_id__v FROM account__v"):
            for identifier in (r["veeva_network_id__v"] for r in page.records):
                accounts[identifier] = accounts.get(identifier, 0) + 1
        sent = {x["external_id__v"] for p in crm.query("SELECT external_id__v FROM clinical_interaction__v")
                for x in p.records}
        good = [a for a in activities if accounts.get(a["person__vr.veeva_network_id__c"]) == 1]
        assert good and all(a["global_id__sys"] in sent for a in good)
    finally:
        ctms.close()
        crm.close()
