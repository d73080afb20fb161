"""Both DAGs end to end with dag.test() against two sandbox vaults seeded with the demo scenario.

The demo seed carries the defects the rules must handle: a Person without a CRM Account, one
without an identifier, one matching two Accounts, a CTMS user without an email, flagged
Monitoring Events / Communication Logs, calls flagged and not flagged for Vault Clinical.
Every rule is checked by reading the target vault over its API. The tests of this module
are one story and run in order (module-scoped vaults).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.vault import vql
from clinical_crm.vault.client import VaultClient
from clinical_crm.engine.ledger import Ledger
from clinical_crm.rules import automated_external_id, from_label
from clinical_crm.values import blank

pytestmark = pytest.mark.usefixtures("airflow_db")

USER, PASSWORD = "integration@sandbox.example", "sandbox"


@pytest.fixture(scope="module")
def clients(vaults):
    ctms_server, crm_server = vaults
    ctms = VaultClient(ctms_server.url, USER, PASSWORD)
    crm = VaultClient(crm_server.url, USER, PASSWORD)
    yield ctms, crm
    ctms.close()
    crm.close()


@pytest.fixture(scope="module")
def story():
    """State handed from one test of the story to the next."""
    return {"start": datetime.now(timezone.utc)}


def now() -> datetime:
    return datetime.now(timezone.utc)


def run_dag(dag_id: str, conf: dict | None = None, logical_date: datetime | None = None):
    from clinical_crm.airflow.dag_factory import build_dags

    dag = build_dags()[dag_id]
    return dag.test(run_conf=conf or {}, logical_date=logical_date or now())


def window(start: datetime, end: datetime) -> dict:
    return {"window_start": start.isoformat(), "window_end": end.isoformat()}


def rows(client, statement: str) -> list[dict]:
    """Records of a query, missing values as None (frames may hold NaN)."""
    return [{k: (None if blank(v) else v) for k, v in r.items()}
            for page in client.query(statement) for r in page.records]


def count(client, object_name: str, where: str = "") -> int:
    return len(rows(client, f"SELECT id FROM {object_name}" + (f" WHERE {where}" if where else "")))


def last_run(direction: str) -> dict:
    return next(r for r in Ledger().recent_runs("demo", limit=10) if r["direction"] == direction)


def interactions(crm) -> dict[str, dict]:
    statement = ("SELECT id, external_id__v, account__v, interaction_date__v, call_channel__v, call2_status__v, "
                 "from__v, subject__v, clinical_study__vr.external_id__v, clinical_site__vr.external_id__v, "
                 "study_country__v, context__v FROM clinical_interaction__v")
    return {r["external_id__v"]: r for r in rows(crm, statement)}


CLINICAL_ACTIVITIES = (
    "SELECT id, global_id__sys, person__vr.veeva_network_id__c, activity_date__v, channel__v, complete__v, "
    "subject__v, created_by__vr.first_name__sys, created_by__vr.last_name__sys, created_by__vr.email__sys, "
    "study__vr.global_id__sys, site__vr.global_id__sys, study_country__vr.country__v, external_id__v "
    "FROM crm_activity__v WHERE object_type__vr.api_name__v = 'clinical_activity__v'")


def check_quarantine_files(ctms, run_id: str, quarantined: set[str]) -> None:
    """The run's quarantine CSV / JSON (paths in its DQ summary) list every record it held back,
    with rules and reasons, and no person's name or email."""
    import csv
    import json

    from clinical_crm.engine.quarantine_report import run_file

    summary = json.loads(run_file("demo", "ctms_to_crm", run_id, ".json").read_text())
    assert summary["quarantine_csv"].endswith(".quarantine.csv") and summary["new_quarantined"] >= 3
    table = list(csv.DictReader(open(summary["quarantine_csv"], encoding="utf-8")))
    records = json.loads(open(summary["quarantine_json"], encoding="utf-8").read())
    assert {r["source_id"] for r in table} == {r["source_id"] for r in records} == quarantined
    assert all(r["object"] == "crm_activity__v" and r["rules"] and r["reasons"] for r in table)
    assert any("person_account_match" in r["rules"] and "no CRM Account has" in r["reasons"] for r in table)
    text = open(summary["quarantine_csv"]).read() + open(summary["quarantine_json"]).read()
    people = rows(ctms, "SELECT first_name__sys, last_name__sys, email__sys FROM person__sys")
    people += rows(ctms, "SELECT first_name__sys, last_name__sys, email__sys FROM user__sys")
    assert "@" not in text
    for p in people:
        assert f"{p['first_name__sys']} {p['last_name__sys']}" not in text


def test_ctms_to_crm_sends_every_rule(clients, story):
    ctms, crm = clients
    study_id = rows(ctms, "SELECT id FROM study__v")[0]["id"]
    [no_person] = ctms.create("monitoring_event__ctms", [
        {"name__v": "IMV without a person", "study__ctms": study_id, "event_date__ctms": "2026-01-15",
         "activity_update_required__ctms": True}])
    dr = run_dag("ctms_to_crm__demo", window(now() - timedelta(days=30), now()))
    assert dr.state == "success"
    run = last_run("ctms_to_crm")
    assert run["state"] == "success" and run["dq_report"].endswith("index.html")

    # Automated activities: every flagged Monitoring Event / Communication Log with a Person got
    # its Clinical Activity (linked back, deterministic external id) and its flag cleared.
    events = rows(ctms, "SELECT id, global_id__sys, person__ctms, activity_update_required__ctms "
                        "FROM monitoring_event__ctms")
    automated = {r["external_id__v"]: r for r in rows(ctms, CLINICAL_ACTIVITIES) if r["external_id__v"]}
    linked = [e for e in events if automated_external_id(e["global_id__sys"]) in automated]
    assert linked, "no Clinical Activity was created for a flagged Monitoring Event"
    assert all(e["activity_update_required__ctms"] is False for e in linked)
    assert count(ctms, "monitoring_event__ctms", "activity_update_required__ctms = true AND person__ctms != null") == 0
    # ... and one without a Person is reported and left flagged
    flag = rows(ctms, "SELECT activity_update_required__ctms FROM monitoring_event__ctms "
                      f"WHERE id = {vql.quote(no_person.id)}")
    assert flag == [{"activity_update_required__ctms": True}]
    assert [o["outcome"] for o in Ledger().record_history("demo", no_person.id)["outcomes"]] == ["needs_person"]
    # the pre-step's writes to CTMS are counted apart from what went to CRM (issue 20)
    pre = run["counts"]["pre_step"]
    assert pre["monitoring_event__ctms"]["created"] >= 1 and pre["monitoring_event__ctms"]["needs_person"] >= 1
    assert not any("flagged" in c for k, c in run["counts"].items() if k != "pre_step" and isinstance(c, dict))
    # every long step left its last progress in the run's row (kept when the run ends)
    steps = Ledger().progress(run["run_id"])
    assert any(s.startswith("extract ") for s in steps) and any(s.startswith("load ") for s in steps), steps
    assert all(f["state"] == "done" and f["done"] == (f["total"] if f["total"] is not None else f["done"])
               for f in steps.values() if f["what"].startswith("load ")), steps

    # Clinical Activities -> Vault Clinical Interactions, rule by rule.
    accounts = rows(crm, "SELECT id, veeva_network_id__v FROM account__v")
    by_identifier: dict[str, list[str]] = {}
    for a in accounts:
        by_identifier.setdefault(a["veeva_network_id__v"], []).append(a["id"])
    sent = interactions(crm)
    activities = rows(ctms, CLINICAL_ACTIVITIES)
    quarantined = {q["source_id"] for q in Ledger().open_quarantine("demo")}
    checked_no_email = False
    for a in activities:
        identifier = a["person__vr.veeva_network_id__c"]
        matches = by_identifier.get(identifier, []) if identifier else []
        if len(matches) != 1:  # no identifier, no Account, or two Accounts: held back, not sent
            assert a["global_id__sys"] not in sent
            assert a["id"] in quarantined
            continue
        i = sent[a["global_id__sys"]]
        assert i["account__v"] == matches[0]
        assert i["interaction_date__v"] == a["activity_date__v"]
        assert i["call_channel__v"] == a["channel__v"]  # the demo map is 1:1 by name
        assert i["call2_status__v"] == ("submitted__v" if a["complete__v"] else "planned__v")
        assert i["subject__v"] == a["subject__v"]
        assert i["from__v"] == from_label(a["created_by__vr.first_name__sys"], a["created_by__vr.last_name__sys"],
                                          a["created_by__vr.email__sys"])
        if not a["created_by__vr.email__sys"]:
            checked_no_email = True
            assert "(" not in i["from__v"]
        assert i["clinical_study__vr.external_id__v"] == a["study__vr.global_id__sys"]
        assert i["clinical_site__vr.external_id__v"] == a["site__vr.global_id__sys"]
        assert i["study_country__v"] == a["study_country__vr.country__v"]
    assert checked_no_email
    assert len(quarantined) >= 3
    reasons = " | ".join(r for q in Ledger().open_quarantine("demo") for r in q["reasons"])
    assert "ambiguous" in reasons and "no CRM Account" in reasons and "has no veeva_network_id__c" in reasons
    check_quarantine_files(ctms, dr.run_id, quarantined)

    # Studies and Study Sites -> Clinical Studies / Sites, linked by external id.
    studies = rows(ctms, "SELECT id, global_id__sys, study_title__v FROM study__v")
    crm_studies = {r["external_id__v"]: r for r in rows(
        crm, "SELECT id, external_id__v, study_title__v, vault_clinical_status__v FROM clinical_study__v")}
    assert {s["global_id__sys"] for s in studies} == set(crm_studies)
    assert all(crm_studies[s["global_id__sys"]]["study_title__v"] == s["study_title__v"] for s in studies)
    sites = rows(ctms, "SELECT id, global_id__sys, study__vr.global_id__sys FROM site__v")
    crm_sites = {r["external_id__v"]: r for r in rows(
        crm, "SELECT id, external_id__v, clinical_study__vr.external_id__v FROM clinical_site__v")}
    assert {s["global_id__sys"] for s in sites} == set(crm_sites)
    assert all(crm_sites[s["global_id__sys"]]["clinical_study__vr.external_id__v"] == s["study__vr.global_id__sys"]
               for s in sites)
    story["sent"] = len(sent)
    story["first_end"] = now()
    story["first_run_id"] = dr.run_id


def test_the_load_emits_an_asset_event_per_target_object(story):
    """Airflow's metadata DB holds one asset event per target object for the run, counts in extra."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = {uri: (extra, task) for uri, extra, task in session.execute(
            select(AssetModel.uri, AssetEvent.extra, AssetEvent.source_task_id).join(
                AssetModel, AssetModel.id == AssetEvent.asset_id)
            .where(AssetEvent.source_run_id == story["first_run_id"]))}
    assert set(events) == {"vault://demo/clinical_study__v", "vault://demo/clinical_site__v",
                           "vault://demo/clinical_interaction__v"}
    assert {task for _, task in events.values()} == {"load"}
    interaction, _ = events["vault://demo/clinical_interaction__v"]
    assert interaction["dag_run_id"] == story["first_run_id"] and interaction["source_object"] == "crm_activity__v"
    assert interaction["counts"]["created"] == story["sent"] and interaction["counts"]["failed"] == 0
    study, _ = events["vault://demo/clinical_study__v"]
    assert study["counts"]["created"] > 0 and study["window_end"] == interaction["window_end"]


def test_rerunning_the_window_changes_nothing(clients, story):
    ctms, crm = clients
    before = interactions(crm)
    dr = run_dag("ctms_to_crm__demo", window(now() - timedelta(days=30), now()))
    assert dr.state == "success"
    after = interactions(crm)
    assert after == before  # no duplicates, no changed field
    counts = last_run("ctms_to_crm")["counts"]["crm_activity__v"]
    assert counts.get("created", 0) == 0
    # a successful run leaves no staged files behind (the ledger keeps what happened)
    from airflow.sdk import ObjectStoragePath

    from clinical_crm.engine import staging

    assert not ObjectStoragePath(staging.run_dir("demo", "ctms_to_crm", dr.run_id)).exists()
    assert ObjectStoragePath(staging.run_dir("demo", "ctms_to_crm", "x")).parent.exists()


def test_automated_activity_is_updated_not_duplicated(clients):
    ctms, crm = clients
    event = next(e for e in rows(ctms, "SELECT id, global_id__sys, person__ctms FROM monitoring_event__ctms")
                 if e["person__ctms"])
    external_id = automated_external_id(event["global_id__sys"])
    automated = "external_id__v != null AND object_type__vr.api_name__v = 'clinical_activity__v'"
    automated_before = count(ctms, "crm_activity__v", automated)
    assert ctms.update("monitoring_event__ctms", [{"id": event["id"], "event_date__ctms": "2026-05-05",
                                                   "activity_update_required__ctms": True}])[0].outcome == "updated"
    assert run_dag("ctms_to_crm__demo", window(now() - timedelta(minutes=1), now())).state == "success"
    assert count(ctms, "crm_activity__v", automated) == automated_before
    [activity] = rows(ctms, "SELECT global_id__sys, activity_date__v FROM crm_activity__v "
                            f"WHERE external_id__v = {vql.quote(external_id)}")
    assert activity["activity_date__v"] == "2026-05-05"
    assert rows(ctms, "SELECT activity_update_required__ctms FROM monitoring_event__ctms "
                      f"WHERE id = {vql.quote(event['id'])}") == [{"activity_update_required__ctms": False}]
    assert interactions(crm)[activity["global_id__sys"]]["interaction_date__v"] == "2026-05-05"  # sent in the same run


def test_deletions_are_marked_once(clients, vaults, story):
    ctms, crm = clients
    ctms_server, _ = vaults
    sent = interactions(crm)
    activity = next(a for a in rows(ctms, CLINICAL_ACTIVITIES) if a["global_id__sys"] in sent)
    site = rows(ctms, "SELECT id, global_id__sys FROM site__v")[0]
    held = next(q["source_id"] for q in Ledger().open_quarantine("demo") if "ambiguous" in q["reasons"][0])
    start = now() - timedelta(minutes=1)
    for obj, rid in (("crm_activity__v", activity["id"]), ("site__v", site["id"]), ("crm_activity__v", held)):
        body = ctms_server.admin.call("DELETE", f"/api/v25.2/vobjects/{obj}/{rid}")
        assert body["responseStatus"] == "SUCCESS", body
    for _ in range(2):  # the second run must not append the suffix again
        dr = run_dag("ctms_to_crm__demo", window(start, now() + timedelta(seconds=1)))
        assert dr.state == "success"
        subject = interactions(crm)[activity["global_id__sys"]]["subject__v"]
        assert subject == f"{activity['subject__v']} Deleted"
        status = rows(crm, "SELECT vault_clinical_status__v FROM clinical_site__v WHERE external_id__v = "
                      + vql.quote(site["global_id__sys"]))
        assert status == [{"vault_clinical_status__v": "deleted_in_vault_clinical__v"}]
    assert count(crm, "clinical_site__v") == count(ctms, "site__v") + 1  # marked, never removed or created
    # a quarantined record deleted in CTMS leaves the quarantine (nothing left to send)
    assert held not in {q["source_id"] for q in Ledger().open_quarantine("demo")}
    assert "source_deleted" in [o["outcome"] for o in Ledger().record_history("demo", held)["outcomes"]]


def test_a_subject_ending_in_deleted_still_gets_its_mark_once(clients, vaults):
    """"Once" comes from what the connection did (the ledger's deletion queue), not from the
    subject's text: "Records Deleted" becomes "Records Deleted Deleted", and re-runs or a
    backfill of the window append nothing more."""
    ctms, crm = clients
    ctms_server, _ = vaults
    sent = interactions(crm)
    activity = next(a for a in rows(ctms, CLINICAL_ACTIVITIES)
                    if a["global_id__sys"] in sent and not (a["subject__v"] or "").endswith("Deleted"))
    gid = activity["global_id__sys"]
    start = now() - timedelta(minutes=1)
    assert ctms.update("crm_activity__v",
                       [{"id": activity["id"], "subject__v": "Records Deleted"}])[0].outcome == "updated"
    assert run_dag("ctms_to_crm__demo", window(start, now() + timedelta(seconds=1))).state == "success"
    assert interactions(crm)[gid]["subject__v"] == "Records Deleted"
    body = ctms_server.admin.call("DELETE", f"/api/v25.2/vobjects/crm_activity__v/{activity['id']}")
    assert body["responseStatus"] == "SUCCESS", body
    for window_start in (start, start, now() - timedelta(days=1)):  # the run, a re-run, a backfill
        assert run_dag("ctms_to_crm__demo", window(window_start, now() + timedelta(seconds=1))).state == "success"
        assert interactions(crm)[gid]["subject__v"] == "Records Deleted Deleted"
    outcomes = [o["outcome"] for o in Ledger().record_history("demo", activity["id"])["outcomes"]]
    assert outcomes.count("marked_deleted") == 1


def test_a_manual_run_without_window_params_moves_a_record_created_a_minute_ago(clients):
    """`airflow dags test` / a manual trigger without params covers up to the moment it was
    triggered, not only up to the last full hour of its data interval."""
    ctms, crm = clients
    sent = interactions(crm)
    model = next(a for a in rows(ctms, CLINICAL_ACTIVITIES.replace("SELECT id,", "SELECT id, person__v,"))
                 if a["global_id__sys"] in sent)
    [created] = ctms.create("crm_activity__v", [{
        "object_type__vr.api_name__v": "clinical_activity__v", "person__v": model["person__v"],
        "activity_date__v": "2026-11-30", "channel__v": "phone__v", "complete__v": False,
        "subject__v": "Logged a minute ago"}])
    assert created.outcome == "created"
    [record] = rows(ctms, f"SELECT global_id__sys FROM crm_activity__v WHERE id = {vql.quote(created.id)}")
    dr = run_dag("ctms_to_crm__demo")  # no params: the logical date is now
    assert dr.state == "success"
    assert interactions(crm)[record["global_id__sys"]]["subject__v"] == "Logged a minute ago"
    run = last_run("ctms_to_crm")
    assert datetime.fromisoformat(run["window_end"]) > now() - timedelta(minutes=1)


def test_quarantined_record_goes_through_once_the_account_appears(clients, story):
    ctms, crm = clients
    held = [q for q in Ledger().open_quarantine("demo") if any("no CRM Account" in r for r in q["reasons"])]
    assert held
    source_id = held[0]["source_id"]
    activity = rows(ctms, CLINICAL_ACTIVITIES.replace("WHERE", f"WHERE id = {vql.quote(source_id)} AND"))[0]
    outcomes = crm.create("account__v", [{"first_name__v": "New", "last_name__v": "Account", "name__v": "New Account",
                                          "veeva_network_id__v": activity["person__vr.veeva_network_id__c"]}])
    assert outcomes[0].outcome == "created"
    # a narrow recent window: the activity itself did not change, it is read again by id
    dr = run_dag("ctms_to_crm__demo", window(now() - timedelta(minutes=1), now()))
    assert dr.state == "success"
    assert interactions(crm)[activity["global_id__sys"]]["account__v"] == outcomes[0].id
    assert source_id not in {q["source_id"] for q in Ledger().open_quarantine("demo")}
    history = Ledger().record_history("demo", source_id)
    assert [o["outcome"] for o in history["outcomes"]][-1] in ("created", "updated")
    assert "quarantined" in [o["outcome"] for o in history["outcomes"]]


def test_crm_to_ctms_medical_activities(clients, vaults, story):
    ctms, crm = clients
    _, crm_server = vaults
    dr = run_dag("crm_to_ctms__demo", window(now() - timedelta(days=30), now()))
    assert dr.state == "success"
    calls = rows(crm, "SELECT id, global_id__sys, call_date__v, call_channel__v, call2_status__v, subject__v, "
                      "send_to_vault_clinical__v, created_by__vr.first_name__sys, created_by__vr.last_name__sys, "
                      "created_by__vr.email__sys, account__vr.veeva_network_id__v FROM call2__v")
    medical = {r["external_id__v"]: r for r in rows(
        ctms, "SELECT id, external_id__v, person__vr.veeva_network_id__c, activity_date__v, channel__v, complete__v, "
              "from__v, subject__v, status__v FROM crm_activity__v "
              "WHERE object_type__vr.api_name__v = 'medical_activity__v'")}
    flagged = [c for c in calls if c["send_to_vault_clinical__v"]]
    assert any(not c["send_to_vault_clinical__v"] for c in calls)
    assert all(c["global_id__sys"] not in medical for c in calls if not c["send_to_vault_clinical__v"])
    loaded = 0
    for c in flagged:
        m = medical.get(c["global_id__sys"])
        if m is None:
            continue
        loaded += 1
        assert m["person__vr.veeva_network_id__c"] == c["account__vr.veeva_network_id__v"]
        assert m["activity_date__v"] == c["call_date__v"]
        assert m["channel__v"] == c["call_channel__v"]
        assert m["complete__v"] is (c["call2_status__v"] == "submitted__v")
        assert m["subject__v"] == c["subject__v"]
        assert m["from__v"] == from_label(c["created_by__vr.first_name__sys"], c["created_by__vr.last_name__sys"],
                                          c["created_by__vr.email__sys"])
    assert loaded >= len(flagged) - 3
    # No echo: the interactions CRM received are not sent back, Medical Activities are not sent out.
    before = interactions(crm)
    assert run_dag("ctms_to_crm__demo", window(now() - timedelta(days=30), now())).state == "success"
    assert interactions(crm).keys() == before.keys()

    # A deleted call inactivates its Medical Activity (once).
    call = next(c for c in flagged if c["global_id__sys"] in medical)
    start = now() - timedelta(minutes=1)
    assert crm_server.admin.call("DELETE", f"/api/v25.2/vobjects/call2__v/{call['id']}")["responseStatus"] == "SUCCESS"
    for _ in range(2):
        assert run_dag("crm_to_ctms__demo", window(start, now() + timedelta(seconds=1))).state == "success"
        status = rows(ctms, "SELECT status__v FROM crm_activity__v WHERE external_id__v = "
                      + vql.quote(call["global_id__sys"]))
        assert status == [{"status__v": "inactive__v"}]


def test_failed_run_window_is_covered_by_the_next_success(clients, story, monkeypatch):
    ctms, crm = clients
    # a success whose window ended a minute ago ...
    assert run_dag("ctms_to_crm__demo",
                   window(now() - timedelta(hours=1), now() - timedelta(minutes=1))).state == "success"
    last_end = Ledger().last_success_end("demo", "ctms_to_crm")
    # ... then a change, and a scheduled run that fails (wrong password: no retries)
    sent = interactions(crm)
    activity = next(a for a in rows(ctms, CLINICAL_ACTIVITIES) if a["global_id__sys"] in sent)
    assert ctms.update("crm_activity__v",
                       [{"id": activity["id"], "subject__v": "Changed while failing"}])[0].outcome == "updated"
    import os
    good = os.environ["AIRFLOW_CONN_VAULT_CRM_DEMO"]
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CRM_DEMO", good.replace('"password": "sandbox"', '"password": "wrong"'))
    hour = now().replace(minute=0, second=0, microsecond=0)
    failed = run_dag("ctms_to_crm__demo", logical_date=hour + timedelta(hours=2))
    assert failed.state == "failed"
    assert last_run("ctms_to_crm")["state"] == "failed"
    tries = {ti.task_id: ti.try_number for ti in failed.get_task_instances()}
    assert tries["extract"] == 1  # authentication errors fail fast, no retries
    # the next scheduled run's data interval starts after the change, but its window starts at
    # the end of the last success (less the lookback), so the change is sent
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CRM_DEMO", good)
    assert run_dag("ctms_to_crm__demo", logical_date=hour + timedelta(hours=3)).state == "success"
    run = last_run("ctms_to_crm")
    assert datetime.fromisoformat(run["window_start"]) == last_end - timedelta(minutes=10)
    assert interactions(crm)[activity["global_id__sys"]]["subject__v"] == "Changed while failing"


def test_inactive_configuration_moves_nothing(clients, vaults, connections_dir):
    ctms_server, crm_server = vaults
    path = connections_dir / "demo.yaml"
    original = path.read_text()
    path.write_text(original.replace("active: true", "active: false", 1))
    try:
        crm_server.admin.reset_counters()
        ctms_server.admin.reset_counters()
        for dag_id in ("ctms_to_crm__demo", "crm_to_ctms__demo"):
            from clinical_crm.airflow.dag_factory import build_dags

            assert build_dags()[dag_id].is_paused_upon_creation is True
            assert run_dag(dag_id, window(now() - timedelta(days=30), now())).state == "success"
            assert last_run(dag_id.split("__")[0])["state"] == "inactive"
        for server in vaults:
            endpoints = server.admin.counters()["endpoints"]
            assert not [e for e in endpoints if "/query" in e or "/vobjects/" in e], endpoints
    finally:
        path.write_text(original)


def test_too_many_failing_rows_fail_the_run_and_load_nothing(clients, connections_dir):
    ctms, crm = clients
    accounts: dict[str, int] = {}
    for a in rows(crm, "SELECT veeva_network_id__v FROM account__v"):
        accounts[a["veeva_network_id__v"]] = accounts.get(a["veeva_network_id__v"], 0) + 1
    persons = rows(ctms, "SELECT id, veeva_network_id__c FROM person__sys")
    matched = next(p["id"] for p in persons if accounts.get(p["veeva_network_id__c"]) == 1)
    start = now() - timedelta(seconds=5)
    good_one, bad_one = ctms.create("crm_activity__v", [
        {"object_type__vr.api_name__v": "clinical_activity__v", "person__v": matched, "activity_date__v": day,
         "channel__v": "phone__v", "complete__v": False, "subject__v": subject}
        for day, subject in (("2026-04-01", "Good one"), ("1850-04-01", "Bad one"))])
    global_ids = {r["id"]: r["global_id__sys"] for r in rows(
        ctms,
        f"SELECT id, global_id__sys FROM crm_activity__v WHERE id CONTAINS {vql.in_list([good_one.id, bad_one.id])}")}
    path = connections_dir / "demo.yaml"
    original = path.read_text()
    path.write_text(original.replace("max_failing_share: 0.25", "max_failing_share: 0.1"))
    try:
        dr = run_dag("ctms_to_crm__demo", window(start, now() + timedelta(seconds=1)))
        assert dr.state == "failed"
        tries = {ti.task_id: (ti.state, ti.try_number) for ti in dr.get_task_instances()}
        assert tries["validate"] == ("failed", 1)  # not retried: the data, not the system, is wrong
        assert global_ids[good_one.id] not in interactions(crm)  # nothing loaded, not even the good row
        assert last_run("ctms_to_crm")["state"] == "failed"
        assert any("not a valid date" in r for q in Ledger().open_quarantine("demo") if q["source_id"] == bad_one.id
                   for r in q["reasons"])
        # the next run counts the row again (a failed run does not accept its quarantine)
        assert run_dag("ctms_to_crm__demo", window(start, now() + timedelta(seconds=1))).state == "failed"
    finally:
        path.write_text(original)
    # the data engineer fixes the record: the next run sends both
    assert ctms.update("crm_activity__v",
                       [{"id": bad_one.id, "activity_date__v": "2026-04-02"}])[0].outcome == "updated"
    assert run_dag("ctms_to_crm__demo", window(start, now() + timedelta(seconds=1))).state == "success"
    sent = interactions(crm)
    assert sent[global_ids[good_one.id]]["subject__v"] == "Good one"
    assert sent[global_ids[bad_one.id]]["interaction_date__v"] == "2026-04-02"
