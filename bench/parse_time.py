"""DAG folder parse time with ten connection files (twenty DAGs).

    .venv/bin/python bench/parse_time.py [--files 10] [--repeat 5]

Writes `--files` connection files (copies of include/connections/demo.yaml with their own
names and Airflow connection ids) to a temp dir, then, `--repeat` times, starts a FRESH Python
process with CLINICAL_CRM_CONNECTIONS_DIR pointing at them that times
`DagBag(dag_folder=dags/)` (Airflow 3.3 has no include_examples argument; examples are
off through AIRFLOW__CORE__LOAD_EXAMPLES=False) and reports: the DagBag's own per-file
duration (what the DAG processor measures and compares with dagbag_import_timeout), the wall
time of the DagBag() call, and the number of DAGs and import errors. No vault is called while
parsing (the DAG file only reads YAML). Target: under 1 second for twenty DAGs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])  # examples off: AIRFLOW__CORE__LOAD_EXAMPLES=False (3.3 has no include_examples)
t2 = time.perf_counter()
stats = [{"file": s.file,
          "duration": s.duration.total_seconds() if hasattr(s.duration, "total_seconds") else s.duration,
          "dag_num": s.dag_num} for s in bag.dagbag_stats]
print(json.dumps({"import_dagbag_seconds": t1 - t0, "dagbag_seconds": t2 - t1, "dags": len(bag.dags),
                  "import_errors": {k: str(v)[:300] for k, v in bag.import_errors.items()}, "stats": stats}))
"""


def connection_files(folder: Path, count: int) -> None:
    import yaml

    demo = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
    for i in range(count):
        cfg = dict(demo, name=f"org{i:02d}", ctms_conn_id=f"vault_ctms_org{i:02d}", crm_conn_id=f"vault_crm_org{i:02d}",
                   description=f"Parse-time benchmark connection {i}")
        (folder / f"org{i:02d}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_parse_"))
    try:
        connections = tmp / "connections"
        connections.mkdir()
        connection_files(connections, args.files)
        home = tmp / "airflow_home"
        home.mkdir()
        env = {**os.environ, "CLINICAL_CRM_CONNECTIONS_DIR": str(connections), "AIRFLOW_HOME": str(home),
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
               "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
               "CLINICAL_CRM_DATA_DIR": str(tmp / "data"), "GX_ANALYTICS_ENABLED": "False"}
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "dags")], env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-3000:])
                return 1
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["process_seconds"] = time.perf_counter() - started
            runs.append(result)
        load = os.getloadavg()
        print(f"{args.files} connection files; {args.repeat} fresh processes; load average {load[0]:.2f}")
        for r in runs:
            per_file = ", ".join(f"{Path(s['file']).name}: {s['duration']:.3f} s ({s['dag_num']} DAGs)"
                                 for s in r["stats"])
            print(f"  DagBag() {r['dagbag_seconds']:.3f} s wall; per file {per_file}; dags {r['dags']}; "
                  f"import errors {len(r['import_errors'])}; (import of DagBag {r['import_dagbag_seconds']:.2f} s, "
                  f"process {r['process_seconds']:.2f} s)")
            if r["import_errors"]:
                print("  ", r["import_errors"])
        file_durations = [sum(s["duration"] for s in r["stats"]) for r in runs]
        walls = [r["dagbag_seconds"] for r in runs]
        print(f"DAG file parse (DagBag per-file duration): median {statistics.median(file_durations):.3f} s, "
              f"max {max(file_durations):.3f} s; DagBag() wall: median {statistics.median(walls):.3f} s, "
              f"max {max(walls):.3f} s; DAGs: {runs[0]['dags']}")
        from clinical_crm.flows import flow_modules

        expected = (len(flow_modules()) + 1) * args.files  # a DAG per flow, and the reconciliation's
        ok = all(r["dags"] == expected and not r["import_errors"] for r in runs)
        print(f"target < 1 s ({expected} DAGs): {'MET' if max(file_durations) < 1 else 'MISSED'} "
              f"(per-file duration), {'MET' if max(walls) < 1 else 'MISSED'} (DagBag wall); all DAGs parsed: {ok}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
