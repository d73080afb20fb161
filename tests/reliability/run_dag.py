"""Run one DAG with dag.test() in this process (used as a subprocess by the crash and overlap tests).

    python tests/reliability/run_dag.py DAG_ID LOGICAL_DATE [WINDOW_START WINDOW_END]

The environment carries the world (Airflow connections, ledger, connection files). Prints the
DAG run's id and state as the last line: `RESULT <run_id> <state>`.
"""
from __future__ import annotations

import sys
from datetime import datetime


def main(argv: list[str]) -> int:
    from clinical_crm.airflow.dag_factory import build_dags

    dag_id, logical = argv[0], datetime.fromisoformat(argv[1])
    conf = {"window_start": argv[2], "window_end": argv[3]} if len(argv) >= 4 else {}
    dr = build_dags()[dag_id].test(run_conf=conf, logical_date=logical)
    print(f"RESULT {dr.run_id} {dr.state}", flush=True)
    return 0 if dr.state == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
