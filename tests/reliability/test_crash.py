"""Crash: the process running the DAG is killed with SIGKILL while its load task is part-way
through its batch sequence (after k write calls seen in the sandbox's counters); Airflow then
runs the load task of the same DAG run again (`airflow tasks test DAG load RUN_ID`: the task with
the XComs of that run's upstream tasks, as a retry would), then `finish`. The end state equals a
fault-free run's, and the ledger holds one outcome per record.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")
HERE = Path(__file__).parent
WRITE = "POST /api/{version}/vobjects/crm_activity__v"
N, BATCH, KILL_AFTER = 1000, 50, 6
CONCURRENCY = 4  # write calls in flight when the process is killed


def writes(server) -> int:
    return server.admin.counters()["endpoints"].get(WRITE, 0)


def test_sigkill_during_load_then_retry_ends_exact(tmp_path):
    seed = harness.seed_world(tmp_path / "seed", N)
    window = harness.wide_window()
    reference = harness.copy_world(seed, tmp_path / "reference")
    with harness.World(reference, batch_size=BATCH, concurrency=CONCURRENCY) as world:
        assert world.run_dag("crm_to_ctms__demo", window).state == "success"

    folder = harness.copy_world(seed, tmp_path / "crash")
    with harness.World(folder, batch_size=BATCH, concurrency=CONCURRENCY) as world:
        world.ctms.admin.reset_counters()
        logical = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=1)
        env = {**os.environ, **world.env}
        log = open(tmp_path / "killed.log", "wb")
        proc = subprocess.Popen([sys.executable, str(HERE / "run_dag.py"), "crm_to_ctms__demo", logical.isoformat(),
                                 window[0].isoformat(), window[1].isoformat()],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while writes(world.ctms) < KILL_AFTER:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the load never reached its write calls"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        written_at_kill = writes(world.ctms)
        partial = sum(harness.snapshot(folder / "ctms.db")["crm_activity__v"].values()) - N
        assert 0 < partial < N, partial  # killed part-way: some batches in, not all

        from airflow.models import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            run_id = session.query(DagRun.run_id).filter(DagRun.dag_id == "crm_to_ctms__demo",
                                                         DagRun.logical_date == logical).scalar()
        assert run_id
        airflow = str(Path(sys.executable).with_name("airflow"))
        for task in ("load", "finish"):   # the retry of load, then the rest of the run
            done = subprocess.run([airflow, "tasks", "test", "crm_to_ctms__demo", task, run_id], env=env,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        retry_writes = writes(world.ctms) - written_at_kill
        ledger = world.ledger()
        run = next(r for r in ledger.recent_runs("demo", limit=5) if r["dag_run_id"] == run_id)
        with ledger.engine.connect() as conn:
            per_record = conn.execute(text(
                "SELECT source_id, count(*) FROM record_outcomes WHERE run_id = :r AND object = 'call2__v' "
                "GROUP BY source_id"), {"r": run["run_id"]}).all()
            outcomes = dict(conn.execute(text(
                "SELECT outcome, count(*) FROM record_outcomes WHERE run_id = :r GROUP BY outcome"),
                {"r": run["run_id"]}).all())
    print(f"\n[crash] killed after {written_at_kill} write calls with {partial} of {N} records written; "
          f"the retried load made {retry_writes} write calls; outcomes {outcomes}")
    assert run["state"] == "success", run
    assert len(per_record) == N and all(n == 1 for _, n in per_record)  # one outcome per record
    # Nothing written twice: the retry finds what the killed attempt wrote unchanged (no `updated`),
    # and keeps the outcome `created` where the killed attempt had recorded it; the records it
    # wrote but could not record (the calls in flight at the kill) stay `unchanged`.
    assert set(outcomes) <= {"created", "unchanged"} and sum(outcomes.values()) == N, outcomes
    assert outcomes.get("unchanged", 0) <= partial
    for app in ("ctms", "crm"):
        assert harness.compare(harness.snapshot(reference / f"{app}.db"), harness.snapshot(folder / f"{app}.db")) \
            == harness.compare(harness.snapshot(reference / f"{app}.db"), harness.snapshot(reference / f"{app}.db"))
