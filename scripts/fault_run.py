#!/usr/bin/env python
"""The full-size fault run (issue 7): both directions over N records with both sandbox vaults
injecting faults at a 10% rate, compared with a fault-free run over identical copies.

    .venv/bin/python scripts/fault_run.py                 # N=10,000 (about 15 minutes on 2 cores)
    .venv/bin/python scripts/fault_run.py --n 2000 --keep /tmp/fault_run

What it does (tests/reliability/harness.py does the work; tests/reliability/test_faults.py is the
same run at N=1,000 in CI):
1. seeds the scale scenario into a CTMS and a CRM sandbox database (N Clinical Activities, N CRM
   calls flagged for Vault Clinical) and copies them twice;
2. reference: both DAGs (ctms_to_crm__demo, crm_to_ctms__demo) with dag.test() against sandbox
   servers on the first copy, no faults;
3. faults: the same against the second copy with --rate faults of every kind (exception,
   http502, http503, drop, slow, session_expiry; race_condition per written record; each vault's
   first six calls get one call-level fault of each kind, then the seeded random draws) and a low
   burst limit (--burst-limit calls per
   --burst-window seconds; past it the sandbox delays answers, and the client paces itself);
4. compares every row of both vaults (ids, global ids and timestamps left out; references by
   external id) and prints the counts: faults injected (sandbox counters), retries (client
   counters, Airflow task retries), records checked, missing and duplicated rows.
Exit code 0 when both vaults hold exactly what the fault-free run produced, 1 otherwise.
The JSON report is written to <keep>/report.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clinical_crm.settings import airflow_sqlite_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="records per direction (default 10,000)")
    parser.add_argument("--rate", type=float, default=0.10, help="fault rate of both vaults (default 0.10)")
    parser.add_argument("--fault-seed", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=100, help="records per write call (more calls, more faults)")
    parser.add_argument("--concurrency", type=int, default=4, help="load.concurrency: calls in flight at once")
    parser.add_argument("--page-size", type=int, default=200, help="sandbox VQL page size")
    parser.add_argument("--burst-limit", type=int, default=40)
    parser.add_argument("--burst-window", type=float, default=10.0, help="seconds")
    parser.add_argument("--slow-seconds", type=float, default=1.0)
    parser.add_argument("--change-share", type=float, default=0.1,
                        help="second window: share of records deleted, and as many updated, per direction")
    parser.add_argument("--no-heal", action="store_true",
                        help="compare right after the faulty runs (no fault-free run after)")
    parser.add_argument("--keep", type=Path, help="folder for the databases and report (default: a temp dir, removed)")
    args = parser.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="fault_run_"))
    if base.exists() and any(base.iterdir()):
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    home = base / "airflow_home"
    home.mkdir()
    os.environ.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        **airflow_sqlite_env(),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "GX_ANALYTICS_ENABLED": "False",
        "CLINICAL_CRM_RETRY_DELAY_SECONDS": "1",
    })
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, capture_output=True, timeout=600)

    import harness

    started = time.monotonic()
    report = harness.fault_run(base, n=args.n, rate=args.rate, fault_seed=args.fault_seed,
                               batch_size=args.batch_size, concurrency=args.concurrency,
                               page_size=args.page_size,
                               burst_limit=args.burst_limit, burst_window_seconds=args.burst_window,
                               slow_seconds=args.slow_seconds, change_share=args.change_share,
                               heal=not args.no_heal,
                               log=lambda m: print(f"[{time.monotonic() - started:6.0f}s] {m}", flush=True))
    report["seconds"] = round(time.monotonic() - started)
    (base / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print()
    for line in harness.summary_lines(report):
        print(line)
    print(f"took {report['seconds']} s; report: {base / 'report.json'}")
    agreement = report["faults"]["ledger_against_vault"]
    exact = (report["missing"] == 0 and report["extra"] == 0 and agreement["mapped_missing_in_vault"] == 0
             and agreement["applied_without_mark_in_vault"] == 0
             and (args.no_heal or agreement["deletions_pending"] == 0))
    failed = [d for d, r in report["faults"]["dag_runs"].items() if r["state"] != "success"]
    verdict = ("exact end state (nothing lost, nothing duplicated, the ledger agrees with the vaults)"
               if exact else "MISMATCH")
    if failed:
        verdict += f"; DAG runs that failed under faults: {', '.join(failed)}"
        if not args.no_heal:
            verdict += " (the fault-free run after them healed what they left)"
    print("RESULT:", verdict)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
