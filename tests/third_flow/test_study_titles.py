"""The third flow (study_titles.py beside this file) through every step, found by name only:
its DAG, extraction, the quality check, the load, a deletion mark and reconciliation."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.engine.ledger import Ledger
from clinical_crm.vault.client import VaultClient

pytestmark = pytest.mark.usefixtures("airflow_db")

USER, PASSWORD = "integration@sandbox.example", "sandbox"


@pytest.fixture
def flow_found(monkeypatch, tmp_path):
    """The third flow found by name; a ledger of its own, so no other test sees its runs."""
    monkeypatch.setenv("CLINICAL_CRM_FLOW_MODULES", "study_titles")
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")


def studies(client, object_name: str) -> dict[str, dict]:
    return {r["global_id__sys" if object_name == "study__v" else "external_id__v"]: r
            for page in client.query(
                f"SELECT id, {'global_id__sys' if object_name == 'study__v' else 'external_id__v'}, "
                f"study_title__v{', vault_clinical_status__v' if object_name != 'study__v' else ''} "
                f"FROM {object_name}") for r in page.records}


def test_a_flow_module_runs_through_every_step(flow_found, vaults, demo_cfg):
    from clinical_crm.airflow.dag_factory import build_dags
    from clinical_crm.engine import reconcile
    from clinical_crm.flows import build

    ctms_server, crm_server = vaults
    ctms, crm = VaultClient(ctms_server.url, USER, PASSWORD), VaultClient(crm_server.url, USER, PASSWORD)
    [untitled] = ctms.create("study__v", [{"name__v": "UNTITLED-1"}])
    [doomed] = ctms.create("study__v", [{"name__v": "DOOMED-1", "study_title__v": "A study to delete"}])
    dags = build_dags()
    assert "study_titles__demo" in dags and "reconcile_study_titles" in dags["reconcile__demo"].task_ids
    start = datetime.now(timezone.utc) - timedelta(days=400)

    def run() -> str:
        now = datetime.now(timezone.utc)
        dr = build_dags()["study_titles__demo"].test(
            run_conf={"window_start": start.isoformat(), "window_end": now.isoformat()}, logical_date=now)
        assert dr.state == "success"
        return dr.run_id

    run()
    sent = studies(crm, "clinical_study__v")
    source = studies(ctms, "study__v")
    titled = {g: r for g, r in source.items() if r.get("study_title__v")}
    assert set(titled) <= set(sent)
    assert all(sent[g]["study_title__v"] == r["study_title__v"] for g, r in titled.items())
    untitled_global = next(g for g, r in source.items() if r["id"] == untitled.id)
    assert untitled_global not in sent
    ledger = Ledger()
    assert ledger.quarantined_ids("demo", "study_titles", "study__v") == [untitled.id]

    assert ctms_server.admin.call("DELETE", f"/api/v25.2/vobjects/study__v/{doomed.id}")["responseStatus"] == "SUCCESS"
    run()
    doomed_global = next(g for g, r in source.items() if r["id"] == doomed.id)
    assert studies(crm, "clinical_study__v")[doomed_global]["vault_clinical_status__v"] in (
        ["deleted_in_vault_clinical__v"], "deleted_in_vault_clinical__v")
    run_row = next(r for r in ledger.recent_runs("demo", limit=5) if r["direction"] == "study_titles")
    assert run_row["counts"]["study__v"]["deletions_applied"] == 1

    flow = build("study_titles", demo_cfg)
    summary = reconcile.reconcile(flow, demo_cfg, {"ctms": ctms, "crm": crm}, "manual__third_flow")
    found = summary["objects"]["clinical_study__v"]
    assert found["expected"] == len(titled) - 1  # the deleted one is gone from the source
    assert found["missing"] == found["stale"] == found["missing_deletion_mark"] == 0
