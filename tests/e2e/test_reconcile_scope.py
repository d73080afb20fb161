"""Reconciliation within the connection's scope (engine/reconcile.py, docs/pipeline.md), against
two sandbox vaults over real HTTP whose records were last changed a year before the
connection's start date (the demo seed with `--now` a year back).

One story (module-scoped vaults, tests run in order): the old history is neither reported nor
written, with or without repair; records changed after the start date are compared (reported
missing before the connection sends them, then in agreement); and once the connection wrote a
record it stays compared, even judged against a start date after its last change.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.engine import reconcile, runner
from clinical_crm.engine.ledger import Ledger
from clinical_crm.flows import build, build_all
from clinical_crm.values import blank
from clinical_crm.vault.client import VaultClient

USER, PASSWORD = "integration@sandbox.example", "sandbox"
API = "/api/v25.2/vobjects"
A_YEAR_AGO = datetime.now(timezone.utc) - timedelta(days=365)
TARGETS = {"crm": ("clinical_interaction__v", "clinical_study__v", "clinical_site__v"), "ctms": ("crm_activity__v",)}
TOUCHED = 8  # old Clinical Activities changed after the start date


def now() -> datetime:
    return datetime.now(timezone.utc)


def rows(client, statement: str) -> list[dict]:
    return [{k: (None if blank(v) else v) for k, v in r.items()} for page in client.query(statement)
            for r in page.records]


def snapshot(clients) -> dict:
    """Every record of every target object, with its modified date (a write changes it)."""
    return {obj: sorted((r["id"], r["modified_date__v"]) for r in rows(clients[side],
                                                                       f"SELECT id, modified_date__v FROM {obj}"))
            for side, objects in TARGETS.items() for obj in objects}


@pytest.fixture(scope="module")
def old_vaults(tmp_path_factory, monkeypatch_module):
    from vault_sandbox.testing import SandboxServer

    data = tmp_path_factory.mktemp("scope_data")
    monkeypatch_module.setattr(reconcile, "VALIDATE_ROWS", 16)  # the demo's 80 activities validated in blocks
    monkeypatch_module.setenv("CLINICAL_CRM_DATA_DIR", str(data))
    monkeypatch_module.setenv("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{data / 'ledger.db'}")
    seeded = A_YEAR_AGO.strftime("%Y-%m-%dT%H:%M:%SZ")
    with SandboxServer("ctms", data / "ctms.db", seed="demo", now=seeded) as ctms_server, \
            SandboxServer("crm", data / "crm.db", seed="demo", now=seeded) as crm_server, \
            VaultClient(ctms_server.url, USER, PASSWORD) as ctms, VaultClient(crm_server.url, USER, PASSWORD) as crm:
        yield {"ctms": ctms, "crm": crm}, (ctms_server, crm_server)


def connection(demo_cfg, start: datetime):
    """The demo connection file with this start date."""
    return demo_cfg.model_copy(update={"schedule": demo_cfg.schedule.model_copy(update={"start_date": start})})


@pytest.fixture(scope="module")
def demo(old_vaults):
    from pathlib import Path

    from clinical_crm.config import load_connection

    return load_connection(Path(__file__).resolve().parents[2] / "include" / "connections" / "demo.yaml")


@pytest.fixture(scope="module")
def today():
    return now().replace(hour=0, minute=0, second=0, microsecond=0)


def reconcile_all(cfg, clients, repair: bool) -> dict[tuple[str, str], dict]:
    """Reconcile every flow; the drift found by (flow, external id)."""
    ledger, found = Ledger(), {}
    for flow in build_all(cfg):
        summary = reconcile.reconcile(flow, cfg, clients, f"scope-{flow.name}-{now().isoformat()}", repair=repair,
                                      ledger=ledger)
        for d in ledger.drift(cfg.name, limit=10_000, run_id=summary["run_id"]):
            found[(flow.name, d["external_id"])] = d
    return found


def send(cfg, clients, start: datetime) -> None:
    """One ctms_to_crm run over (start, now], its steps in this process."""
    flow = build("ctms_to_crm", cfg)
    ctx = runner.begin(flow, cfg, f"scope-send-{now().isoformat()}", None, None,
                       {"window_start": start.isoformat(), "window_end": (now() + timedelta(seconds=1)).isoformat()})
    staged = runner.extract(flow, cfg, ctx, clients)
    records = runner.transform(flow, cfg, ctx, staged, runner.validate(flow, cfg, ctx, staged))
    runner.load(flow, cfg, ctx, clients["crm"], staged, records)
    runner.finish(ctx)


@pytest.fixture(scope="module")
def activities(old_vaults):
    clients, _ = old_vaults
    return rows(clients["ctms"], "SELECT id, global_id__sys, subject__v, modified_date__v FROM crm_activity__v "
                                 "WHERE object_type__vr.api_name__v = 'clinical_activity__v'")


@pytest.fixture(scope="module")
def valid(old_vaults, demo) -> set[str]:
    """The global ids of the activities that pass the rules: under a start date before the
    history, reconciliation finds each of them missing (the connection never sent them)."""
    clients, _ = old_vaults
    found = reconcile_all(connection(demo, A_YEAR_AGO - timedelta(days=30)), clients, repair=False)
    return {e for (_, e), d in found.items() if d["object"] == "clinical_interaction__v" and d["kind"] == "missing"}


def test_history_before_the_start_date_is_no_drift_and_nothing_is_written(old_vaults, demo_cfg, today, activities,
                                                                         valid):
    clients, _ = old_vaults
    assert activities and all(datetime.fromisoformat(a["modified_date__v"].replace("Z", "+00:00")) < today
                              for a in activities), "the seed's records all changed before the start date"
    cfg = connection(demo_cfg, today)
    before = snapshot(clients)
    assert reconcile_all(cfg, clients, repair=False) == {}
    assert reconcile_all(cfg, clients, repair=True) == {}
    assert snapshot(clients) == before, "repair wrote nothing"
    # the same history under a start date before it: every valid record is the connection's, and missing
    assert len(valid) > TOUCHED


def test_records_changed_after_the_start_date_are_compared(old_vaults, demo_cfg, today, activities, valid):
    clients, _ = old_vaults
    ctms, crm = clients["ctms"], clients["crm"]
    cfg = connection(demo_cfg, today)
    touched = [a for a in activities if a["global_id__sys"] in valid][:TOUCHED]
    assert all(r.outcome == "updated" for r in ctms.update(
        "crm_activity__v", [{"id": a["id"], "subject__v": f"{a['subject__v'] or 'Visit'} (followed up)"}
                            for a in touched]))
    found = reconcile_all(cfg, clients, repair=False)
    touched_ids = {a["global_id__sys"] for a in touched}
    interactions = {e for (flow, e), d in found.items() if d["object"] == "clinical_interaction__v"}
    # the touched activities are missing (the connection has not run yet); their studies and
    # sites too (the connection sends them with them); nothing of the rest
    assert interactions == touched_ids
    assert {d["kind"] for d in found.values()} == {"missing"}
    assert {flow for flow, _ in found} == {"ctms_to_crm"}
    assert {d["object"] for d in found.values()} <= {"clinical_interaction__v", "clinical_study__v", "clinical_site__v"}

    # the connection sends them: the vaults agree, the old history still out of scope
    send(cfg, clients, today)
    sent = {r["external_id__v"]: r for r in rows(crm, "SELECT id, external_id__v, subject__v "
                                                      "FROM clinical_interaction__v") if r["external_id__v"]}
    assert interactions <= set(sent) and len(sent) == TOUCHED
    assert reconcile_all(cfg, clients, repair=False) == {}

    # what the connection wrote stays compared, even with a start date after the records' last
    # change (the ledger's id map): one interaction edited in CRM (stale), one deleted (missing)
    stale, missing = sorted(interactions)[:2]
    assert crm.update("clinical_interaction__v", [{"id": sent[stale]["id"], "subject__v": "Edited in CRM"}]
                      )[0].outcome == "updated"
    _, crm_server = old_vaults[1]
    assert crm_server.admin.call("DELETE", f"{API}/clinical_interaction__v/{sent[missing]['id']}"
                                 )["responseStatus"] == "SUCCESS"
    later = connection(demo_cfg, now() + timedelta(seconds=1))
    found = reconcile_all(later, clients, repair=True)
    assert {e: d["kind"] for (_, e), d in found.items()} == {stale: "stale", missing: "missing"}
    assert all(d["repaired_at"] for d in found.values())
    repaired = {r["external_id__v"]: r for r in rows(crm, "SELECT external_id__v, subject__v FROM clinical_interaction__v")
                if r["external_id__v"]}
    assert repaired[stale]["subject__v"] == sent[stale]["subject__v"]
    assert repaired[missing]["subject__v"] == sent[missing]["subject__v"]
    assert reconcile_all(later, clients, repair=False) == {}
