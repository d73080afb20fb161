"""The demo (README command 1): both sandbox vaults, both DAGs, the last few hourly windows.

Runs everything through Airflow itself (`airflow dags test` per window, on SQLite under
data/airflow), then prints one summary table per run from the ledger and the path of the
data-quality report. Re-running starts the vaults afresh (demo data relative to now) and keeps
the Airflow and ledger history. Servers it starts are stopped on exit, also on Ctrl-C.

    .venv/bin/python scripts/demo.py [--windows 4] [--ctms-port 8701] [--crm-port 8702]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from clinical_crm.settings import airflow_sqlite_env

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def demo_environment(data: Path, ctms_url: str, crm_url: str) -> dict[str, str]:
    """Airflow on SQLite under data/airflow; the vault connections as Airflow connections."""
    env = dict(os.environ)
    env.update({
        "AIRFLOW_HOME": str(data / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        **airflow_sqlite_env(),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
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


def summary(since_run_id: int) -> int:
    """Print a table per run recorded by this demo; returns the number of failed runs."""
    from tabulate import tabulate

    from clinical_crm.engine.ledger import Ledger

    failed = 0
    for run in reversed(Ledger().recent_runs("demo", limit=50)):
        if run["run_id"] <= since_run_id:
            continue
        failed += run["state"] != "success"
        print(f"\n{run['direction']}  window {run['window_start']} -> {run['window_end']}  "
              f"state: {run['state']}  ({run['dag_run_id']})")
        rows = []
        for obj, c in sorted(run["counts"].items()):
            rows.append([obj, c.get("extracted", 0), c.get("created", 0) + c.get("updated", 0),
                         c.get("unchanged", 0), c.get("quarantined", 0), c.get("failed", 0),
                         c.get("deletions_applied", 0)])
        print(tabulate(rows, headers=["object", "extracted", "loaded", "unchanged", "quarantined", "failed",
                                      "deletions"], tablefmt="simple") if rows else "  (nothing moved)")
        if run["dq_report"]:
            print(f"  data-quality report: {run['dq_report']}")
        if run["message"]:
            print(f"  note: {run['message']}")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=3, help="hourly windows to run, ending at the last full hour")
    parser.add_argument("--ctms-port", type=int, default=8701)
    parser.add_argument("--crm-port", type=int, default=8702)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    args = parser.parse_args(argv)

    data = args.data.resolve()
    os.environ["CLINICAL_CRM_DATA_DIR"] = str(data)  # for the ledger read below
    from vault_sandbox.testing import SandboxServer

    now = datetime.now(timezone.utc)
    last_hour = now.replace(minute=0, second=0, microsecond=0)
    (data / "sandbox").mkdir(parents=True, exist_ok=True)
    # Demo data spans the few hours before the last full hour, so the windows below cover it.
    seed_now = last_hour.isoformat().replace("+00:00", "Z")
    servers = [SandboxServer(app, data / "sandbox" / f"{app}.db", seed="demo", port=port, reseed=True,
                             now=seed_now, burst_limit=100000)
               for app, port in (("ctms", args.ctms_port), ("crm", args.crm_port))]
    env = demo_environment(data, servers[0].url, servers[1].url)
    logs = data / "demo-logs"
    try:
        step(f"starting the sandbox vaults: CTMS {servers[0].url}, CRM {servers[1].url} (fresh demo data)")
        for server in servers:
            server.start()
        step("initialising Airflow (SQLite), connections, pools and the ledger: scripts/airflow_init.sh")
        if run_logged(["bash", str(ROOT / "scripts" / "airflow_init.sh")], env, logs / "airflow-init.log"):
            print(f"airflow init failed; see {logs / 'airflow-init.log'}", file=sys.stderr)
            return 1

        from clinical_crm.engine.ledger import Ledger

        before = max((r["run_id"] for r in Ledger().recent_runs("demo", limit=1)), default=0)
        ends = [last_hour - timedelta(hours=k) for k in range(args.windows - 1, -1, -1)]
        total = 2 * len(ends)
        done = 0
        for end in ends:
            for dag_id in ("ctms_to_crm__demo", "crm_to_ctms__demo"):
                done += 1
                started = time.monotonic()
                # The logical date is the window end: the timetable infers the hour before it.
                stamp = end.strftime("%Y-%m-%dT%H:%M:%S+00:00")
                log_path = logs / f"{dag_id}_{end:%Y%m%dT%H%M}.log"
                print(f"[{done}/{total}] airflow dags test {dag_id} {stamp} ...", end="", flush=True)
                code = run_logged([str(VENV_BIN / "airflow"), "dags", "test", dag_id, stamp], env, log_path)
                print(f" {'ok' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f}s  (log: {log_path})",
                      flush=True)
        step("summary per run (from the ledger)")
        failed = summary(before)
        print(f"\nLedger: {data / 'ledger.db'}   Reports: {data / 'reports'}   Task logs: {data / 'airflow' / 'logs'}")
        print("Open the Airflow UI on this state: bash scripts/ui.sh")
        return 1 if failed else 0
    finally:
        step("stopping the sandbox vaults")
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
