"""The demo (README command 1): both sandbox vaults, both DAGs, the last few hourly windows.

Runs the DAGs the way production does: a scheduler (LocalExecutor), an api-server (the
Execution API its task processes talk to) and a dag-processor, on SQLite under data/airflow.
For each DAG an Airflow backfill of the last three hourly windows is created
(`airflow backfill create`, before the scheduler starts, so nothing else writes the SQLite file
at that moment); the scheduler runs it and the demo waits for every run, then prints one table
per run from the ledger with the paths of its data-quality report and quarantine CSV. The
scheduler makes no runs of its own (`use_job_schedule` off): the table holds the backfill's
windows only. Airflow's UI (`bash scripts/ui.sh`) then shows each run with its true duration.

Re-running starts the vaults afresh (demo data relative to now) and keeps the Airflow and ledger
history (a window backfilled before is run again: `--reprocess-behavior completed`). Everything
it starts is stopped on exit (by process id), also on Ctrl-C.

    .venv/bin/python scripts/demo.py [--windows 3] [--ctms-port 8701] [--crm-port 8702]
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

from clinical_crm.settings import airflow_sqlite_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def demo_environment(data: Path, ctms_url: str, crm_url: str, api_port: int) -> dict[str, str]:
    """Airflow on SQLite under data/airflow (LocalExecutor, api-server on 127.0.0.1:api_port);
    the vault connections as Airflow connections."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(data / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{data / 'airflow' / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        **airflow_sqlite_env(),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # the LocalExecutor starts this many task processes (Airflow's default: 32): one per core,
        # at least two so both DAGs' runs can go side by side
        "AIRFLOW__CORE__PARALLELISM": str(max(2, os.cpu_count() or 1)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),  # per demo run: never a literal
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "CLINICAL_CRM_DATA_DIR": str(data),
        "CTMS_VAULT_URL": ctms_url,
        "CRM_VAULT_URL": crm_url,
        "AIRFLOW_BIN": str(VENV_BIN / "airflow"),
        "PYTHON_BIN": sys.executable,
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "GX_ANALYTICS_ENABLED": "False",
    })
    return env


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def run_logged(cmd: list[str], env: dict, log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def counts_tables(run: dict) -> str:
    """A run's counts as the demo prints them: what went to the target vault (loaded = created +
    updated), then, apart, what the pre-step wrote to the source vault (engine.run_counts)."""
    from tabulate import tabulate

    from clinical_crm.engine import run_counts

    target, pre_step = run_counts.split(run["counts"])
    source_side, target_side = (run["direction"].split("_to_") + [""])[:2]
    rows = [[obj, c.get("extracted", 0), c.get("created", 0) + c.get("updated", 0), c.get("unchanged", 0),
             c.get("quarantined", 0), c.get("failed", 0), c.get("deletions_applied", 0)]
            for obj, c in sorted(target.items()) if isinstance(c, dict)]
    text = tabulate(rows, headers=["object", "extracted", f"loaded to {target_side.upper()}", "unchanged",
                                   "quarantined", "failed", "deletions"],
                    tablefmt="simple") if rows else "  (nothing moved)"
    if pre_step:
        rows = [[obj, c.get("created", 0) + c.get("updated", 0), c.get("unchanged", 0), c.get("failed", 0),
                 c.get("flagged", 0), c.get("needs_person", 0)] for obj, c in sorted(pre_step.items())]
        text += (f"\n  pre-step: written to {source_side.upper()} (the source vault), not in the loaded column\n"
                 + tabulate(rows, headers=["from object", f"written to {source_side.upper()}", "unchanged", "failed",
                                           "flagged", "needs person"], tablefmt="simple"))
    return text


def summary(since_run_id: int) -> int:
    """Print a table per run recorded by this demo; returns the number of failed runs."""
    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.engine.quarantine_report import run_file

    failed = 0
    for run in reversed(Ledger().recent_runs("demo", limit=50)):
        if run["run_id"] <= since_run_id:
            continue
        failed += run["state"] != "success"
        print(f"\n{run['direction']}  window {run['window_start']} -> {run['window_end']}  "
              f"state: {run['state']}  ({run['dag_run_id']})")
        print(counts_tables(run))
        if run["dq_report"]:
            print(f"  data-quality report: {run['dq_report']}")
        quarantine = run_file("demo", run["direction"], run["dag_run_id"], ".quarantine.csv")
        if quarantine.exists():
            print(f"  quarantined records: {quarantine}")
        if run["message"]:
            print(f"  note: {run['message']}")
    return failed


class Airflow:
    """The Airflow processes the demo starts (api-server, dag-processor, scheduler), each in its
    own process group, stopped by their ids. The scheduler serves no task logs over HTTP
    (`--skip-serve-logs`: the api-server reads them from data/airflow/logs), so nothing listens
    beyond 127.0.0.1."""

    COMMANDS = (["api-server"], ["dag-processor"], ["scheduler", "--skip-serve-logs"])

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.processes = env, logs, []

    def start(self, timeout: float = 180) -> None:
        """The api-server first: task processes report to its Execution API from their start."""
        for command in self.COMMANDS:
            log = open(self.logs / f"{command[0]}.log", "wb")
            self.processes.append(subprocess.Popen([str(VENV_BIN / "airflow"), *command], env=self.env, cwd=ROOT,
                                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            if command == ["api-server"]:
                self._wait_for_api(timeout)

    def _wait_for_api(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.env['AIRFLOW__API__PORT']}/api/v2/monitor/health"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                urllib.request.urlopen(url, timeout=5).close()
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"the api-server did not answer within {timeout:.0f}s; see {self.logs / 'api-server.log'}")

    def check(self) -> None:
        for command, process in zip(self.COMMANDS, self.processes):
            if process.poll() is not None:
                raise RuntimeError(f"airflow {command[0]} exited; see {self.logs / (command[0] + '.log')}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def create_backfill(dag_id: str, first: datetime, last: datetime, env: dict, log_path: Path) -> None:
    """`airflow backfill create` over the logical dates first..last (a run for logical date L
    covers [L, L + 1h]); windows run before are run again. Tried three times: SQLite may be busy."""
    command = [str(VENV_BIN / "airflow"), "backfill", "create", "--dag-id", dag_id,
               "--from-date", first.isoformat(), "--to-date", last.isoformat(),
               "--max-active-runs", "1", "--reprocess-behavior", "completed"]
    for _ in range(3):
        if run_logged(command, env, log_path) == 0:
            return
        time.sleep(2)
    raise RuntimeError(f"airflow backfill create failed for {dag_id}; see {log_path}")


def backfill_runs(airflow_db: Path, after_id: int) -> list[tuple]:
    """(dag_id, run_id, state, start, end) of the backfill runs made after dag_run id `after_id`."""
    with sqlite3.connect(f"file:{airflow_db}?mode=ro", uri=True, timeout=60) as db:
        return db.execute("SELECT dag_id, run_id, state, start_date, end_date FROM dag_run "
                          "WHERE run_type = 'backfill' AND id > ? ORDER BY id", (after_id,)).fetchall()


def last_dag_run_id(airflow_db: Path) -> int:
    with sqlite3.connect(f"file:{airflow_db}?mode=ro", uri=True, timeout=60) as db:
        return db.execute("SELECT coalesce(max(id), 0) FROM dag_run").fetchone()[0]


def wait_for(airflow: Airflow, airflow_db: Path, after_id: int, expected: int, timeout: float) -> list[tuple]:
    """Wait until the `expected` backfill runs have finished; print each as it finishes."""
    reported: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        airflow.check()
        runs = backfill_runs(airflow_db, after_id)
        for dag_id, run_id, state, started, ended in runs:
            if state in ("success", "failed") and (dag_id, run_id) not in reported:
                reported.add((dag_id, run_id))
                took = (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
                print(f"[{len(reported)}/{expected}] {dag_id} {run_id}: {state} in {took:.0f}s", flush=True)
        if len(reported) == expected:
            return runs
        time.sleep(2)
    raise RuntimeError(f"the backfill runs did not finish within {timeout:.0f}s; see {airflow.logs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=3, help="hourly windows to run, ending at the last full hour")
    parser.add_argument("--ctms-port", type=int, default=8701)
    parser.add_argument("--crm-port", type=int, default=8702)
    parser.add_argument("--api-port", type=int, default=0, help="Airflow api-server port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the runs")
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)

    data = args.data.resolve()
    os.environ["CLINICAL_CRM_DATA_DIR"] = str(data)  # for the ledger read below
    from vault_sandbox.testing import SandboxServer, free_port

    now = datetime.now(timezone.utc)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    (data / "sandbox").mkdir(parents=True, exist_ok=True)
    # Demo data spans the few hours before the last full hour, so the windows below cover it.
    seed_now = last_hour.isoformat().replace("+00:00", "Z")
    servers = [SandboxServer(app, data / "sandbox" / f"{app}.db", seed="demo", port=port, reseed=True,
                             now=seed_now, burst_limit=100000)
               for app, port in (("ctms", args.ctms_port), ("crm", args.crm_port))]
    env = demo_environment(data, servers[0].url, servers[1].url, args.api_port or free_port())
    logs = data / "demo-logs"
    logs.mkdir(parents=True, exist_ok=True)
    airflow = Airflow(env, logs)
    airflow_db = data / "airflow" / "airflow.db"
    dag_ids = ("ctms_to_crm__demo", "crm_to_ctms__demo")
    try:
        step(f"starting the sandbox vaults: CTMS {servers[0].url}, CRM {servers[1].url} (fresh demo data)")
        for server in servers:
            server.start()
        step("initialising Airflow (SQLite), connections, pools and the ledger: scripts/airflow_init.sh")
        if run_logged(["bash", str(ROOT / "scripts" / "airflow_init.sh")], env, logs / "airflow-init.log"):
            print(f"airflow init failed; see {logs / 'airflow-init.log'}", file=sys.stderr)
            return 1
        if run_logged([str(VENV_BIN / "airflow"), "dags", "reserialize"], env, logs / "reserialize.log"):
            print(f"airflow dags reserialize failed; see {logs / 'reserialize.log'}", file=sys.stderr)
            return 1

        from clinical_crm.engine.ledger import Ledger

        before = max((r["run_id"] for r in Ledger().recent_runs("demo", limit=1)), default=0)
        after_id = last_dag_run_id(airflow_db)
        first, last = last_hour - timedelta(hours=args.windows), last_hour - timedelta(hours=1)
        for dag_id in dag_ids:
            step(f"airflow backfill create --dag-id {dag_id} --from-date {first:%Y-%m-%dT%H:%M} "
                 f"--to-date {last:%Y-%m-%dT%H:%M} ({args.windows} hourly windows)")
            create_backfill(dag_id, first, last, env, logs / f"backfill-{dag_id}.log")
        step(f"starting Airflow: api-server, dag-processor, scheduler (LocalExecutor); logs in {logs}")
        airflow.start()
        step("waiting for the scheduler to run the backfills")
        wait_for(airflow, airflow_db, after_id, len(dag_ids) * args.windows, args.timeout)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        step("stopping Airflow and the sandbox vaults")
        airflow.stop()
        for server in servers:
            server.stop()
    step("summary per run (from the ledger)")
    failed = summary(before)
    print(f"\nLedger: {data / 'ledger.db'}   Reports: {data / 'reports'}   Task logs: {data / 'airflow' / 'logs'}")
    print("Open the Airflow UI on this state: bash scripts/ui.sh")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
