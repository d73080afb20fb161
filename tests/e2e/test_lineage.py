"""Lineage end to end: a dag.test() run of ctms_to_crm__demo in a process with OpenLineage's file
transport configured; every task's COMPLETE event names its input and output datasets (vault
objects, staged files, the quarantine files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("airflow_db")

RUN = """
from datetime import datetime, timedelta, timezone
from clinical_crm.airflow.dag_factory import build_dags
now = datetime.now(timezone.utc)
dr = build_dags()["ctms_to_crm__demo"].test(
    run_conf={"window_start": (now - timedelta(days=30)).isoformat(), "window_end": now.isoformat()}, logical_date=now)
assert dr.state == "success", dr.state
"""


def test_each_task_reports_its_input_and_output_datasets(vaults, tmp_path):
    events_file = tmp_path / "openlineage.jsonl"
    env = {**os.environ, "CLINICAL_CRM_DATA_DIR": str(tmp_path / "data"),
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                          "append": True})}
    subprocess.run([sys.executable, "-c", RUN], env=env, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]
    complete = {e["job"]["name"].rsplit(".", 1)[-1]: e for e in events
                if e["eventType"] == "COMPLETE" and e["job"]["name"].startswith("ctms_to_crm__demo.")}
    assert {"extract", "validate", "transform", "load"} <= set(complete)

    def datasets(task, side):
        return {(d["namespace"], d["name"]) for d in complete[task][side]}

    # dag.test() runs every task in one process, where Airflow's hook lineage collector (one per
    # process) keeps what earlier tasks reported; a worker runs each task in a process of its own.
    # So each task is checked for what it adds.
    extract_in, extract_out = datasets("extract", "inputs"), datasets("extract", "outputs")
    assert {("vault://demo", "crm_activity__v"), ("vault://demo", "study__v"),
            ("vault://demo", "site__v")} <= extract_in
    assert any(name.endswith("/clinical_activities.parquet") for ns, name in extract_out if ns == "file")
    assert not any(ns.startswith("vault://") for ns, _ in extract_out)
    validate_out = datasets("validate", "outputs") - extract_out
    assert extract_out <= datasets("validate", "inputs")
    assert sorted(name.rsplit(".", 1)[-1] for _, name in validate_out if ".quarantine." in name) == ["csv", "json"]
    assert any(name.endswith("valid.parquet") for _, name in validate_out)
    records = datasets("transform", "outputs") - datasets("validate", "outputs")
    assert records and all(name.endswith(".records.parquet") for _, name in records)
    assert records <= datasets("load", "inputs")
    written = datasets("load", "outputs") - datasets("transform", "outputs")
    assert written == {("vault://demo", "clinical_interaction__v"), ("vault://demo", "clinical_study__v"),
                       ("vault://demo", "clinical_site__v")}
