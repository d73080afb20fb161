"""The reconcile__demo DAG with dag.test() against two sandbox vaults (demo seed), over real HTTP.

One story (module-scoped vaults, tests run in order): both connection DAGs send the demo seed;
reconciliation then finds nothing; each kind of drift is planted in the target vaults over the
API; a reconcile without repair reports each planted drift by record with the right kind and
changes nothing; a reconcile with repair fixes the vaults (read back over the API) and the next
reconcile finds only the record it never deletes (extra).
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.engine.ledger import Ledger
from clinical_crm.values import blank
from clinical_crm.vault import vql
from clinical_crm.vault.client import VaultClient

pytestmark = pytest.mark.usefixtures("airflow_db", "own_ledger")


@pytest.fixture(scope="module")
def own_ledger(tmp_path_factory, monkeypatch_module):
    """A ledger of this story alone: the session's ledger holds what other modules did with their
    own (identically seeded) vaults, e.g. deletions of records that exist again here."""
    data = tmp_path_factory.mktemp("reconcile_data")
    monkeypatch_module.setenv("CLINICAL_CRM_DATA_DIR", str(data))
    monkeypatch_module.setenv("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{data / 'ledger.db'}")

USER, PASSWORD = "integration@sandbox.example", "sandbox"
API = "/api/v25.2/vobjects"
INTERACTIONS = ("SELECT id, external_id__v, account__v, interaction_date__v, call_channel__v, call2_status__v, "
                "from__v, subject__v, clinical_study__vr.external_id__v, clinical_site__vr.external_id__v, "
                "study_country__v, context__v FROM clinical_interaction__v")
MEDICAL = ("SELECT id, external_id__v, person__v, activity_date__v, channel__v, complete__v, from__v, subject__v, "
           "status__v FROM crm_activity__v WHERE object_type__vr.api_name__v = 'medical_activity__v'")


def now() -> datetime:
    return datetime.now(timezone.utc)


def rows(client, statement: str) -> list[dict]:
    return [{k: (None if blank(v) else v) for k, v in r.items()} for page in client.query(statement)
            for r in page.records]


def by_external_id(client, statement: str) -> dict[str, dict]:
    return {r["external_id__v"]: r for r in rows(client, statement) if r["external_id__v"]}


def run_dag(dag_id: str, conf: dict | None = None):
    from clinical_crm.airflow.dag_factory import build_dags

    return build_dags()[dag_id].test(run_conf=conf or {}, logical_date=now())


def send(dag_id: str, since: datetime | None = None) -> None:
    start = since or now() - timedelta(days=30)
    conf = {"window_start": start.isoformat(), "window_end": (now() + timedelta(seconds=1)).isoformat()}
    assert run_dag(dag_id, conf).state == "success"


def reconcile(repair: bool) -> dict[tuple[str, str], dict]:
    """Run reconcile__demo; this run's drift by (flow, external id)."""
    assert run_dag("reconcile__demo", {"repair": repair}).state == "success"
    found = {}
    for run in Ledger().reconcile_runs("demo", limit=2):
        assert run["state"] == "success" and run["repair"] is repair
        for d in Ledger().drift("demo", limit=10_000, run_id=run["run_id"]):
            found[(d["flow"], d["external_id"])] = d
    return found


def delete(server, object_name: str, record_id: str) -> None:
    assert server.admin.call("DELETE", f"{API}/{object_name}/{record_id}")["responseStatus"] == "SUCCESS"


@pytest.fixture(scope="module")
def clients(vaults):
    ctms_server, crm_server = vaults
    ctms, crm = VaultClient(ctms_server.url, USER, PASSWORD), VaultClient(crm_server.url, USER, PASSWORD)
    yield ctms, crm
    ctms.close()
    crm.close()


@pytest.fixture(scope="module")
def planted(clients, vaults):
    """Both connection DAGs over the demo seed, then one drift of each kind planted by hand."""
    ctms, crm = clients
    ctms_server, crm_server = vaults
    study = rows(ctms, "SELECT id FROM study__v")[0]["id"]
    [site] = ctms.create("site__v", [{"name__v": "RS-1", "site_name__v": "Reconcile site", "study__v": study}])
    send("ctms_to_crm__demo")
    send("crm_to_ctms__demo")
    assert Ledger().open_quarantine("demo"), "the demo seed has records that fail the rules ..."
    assert not reconcile(repair=False), "... and they are not drift: the vaults agree after the connection ran"

    sent = by_external_id(crm, INTERACTIONS)
    activities = {r["global_id__sys"]: r["id"] for r in rows(
        ctms,
        "SELECT id, global_id__sys FROM crm_activity__v WHERE object_type__vr.api_name__v = 'clinical_activity__v'")}
    missing, stale, reverted, unsent = [g for g in sent if g in activities][:4]
    plan = {("ctms_to_crm", missing): "missing", ("ctms_to_crm", stale): "stale",
            ("ctms_to_crm", reverted): "missing_deletion_mark", ("ctms_to_crm", unsent): "missing_deletion_mark"}
    # missing: the interaction deleted in CRM
    delete(crm_server, "clinical_interaction__v", sent[missing]["id"])
    # stale: a field changed in CRM
    assert crm.update("clinical_interaction__v",
                      [{"id": sent[stale]["id"], "subject__v": "Edited in CRM"}])[0].outcome == "updated"
    # missing deletion mark: the activity deleted, the connection marks it, then the mark is reverted in CRM
    start = now() - timedelta(seconds=5)
    delete(ctms_server, "crm_activity__v", activities[reverted])
    send("ctms_to_crm__demo", since=start)
    assert by_external_id(crm, INTERACTIONS)[reverted]["subject__v"].endswith(" Deleted")
    mark_reverted = [{"id": sent[reverted]["id"], "subject__v": sent[reverted]["subject__v"]}]
    assert crm.update("clinical_interaction__v", mark_reverted)[0].outcome == "updated"
    # missing deletion mark: an activity deleted without the connection running since
    delete(ctms_server, "crm_activity__v", activities[unsent])
    # missing deletion mark (a status): a Study Site deleted, its Clinical Site still active
    [site_row] = rows(ctms, f"SELECT global_id__sys FROM site__v WHERE id = {vql.quote(site.id)}")
    site_global_id = site_row["global_id__sys"]
    delete(ctms_server, "site__v", site.id)
    plan[("ctms_to_crm", site_global_id)] = "missing_deletion_mark"
    # extra: an interaction carrying an external id of the CTMS vault that no activity has
    extra = f"{ctms.vault_id}_V0Z000000009999"
    template = sent[stale]
    assert crm.create("clinical_interaction__v", [{
        "external_id__v": extra, "account__v": template["account__v"], "interaction_date__v": "2026-02-02",
        "call_channel__v": "phone__v", "call2_status__v": "planned__v", "subject__v": "Nobody's",
    }])[0].outcome == "created"
    plan[("ctms_to_crm", extra)] = "extra"

    # crm_to_ctms: a Medical Activity changed in CTMS (stale), one left active after its call was deleted
    medical = by_external_id(ctms, MEDICAL)
    calls = {r["global_id__sys"]: r["id"] for r in rows(crm, "SELECT id, global_id__sys FROM call2__v")}
    edited, orphan, unflagged = [g for g in medical if g in calls and medical[g]["status__v"] != "inactive__v"][:3]
    assert ctms.update("crm_activity__v",
                       [{"id": medical[edited]["id"], "channel__v": "other__v"}])[0].outcome == "updated"
    delete(crm_server, "call2__v", calls[orphan])
    # not drift: a call no longer flagged keeps its Medical Activity (the connection leaves it alone)
    assert crm.update("call2__v",
                      [{"id": calls[unflagged], "send_to_vault_clinical__v": False}])[0].outcome == "updated"
    plan[("crm_to_ctms", edited)] = "stale"
    plan[("crm_to_ctms", orphan)] = "missing_deletion_mark"
    return {"plan": plan, "sent": sent, "medical": medical, "missing": missing, "stale": stale,
            "site": site_global_id, "reverted": reverted, "reverted_id": activities[reverted], "unsent": unsent,
            "extra": extra, "edited": edited, "orphan": orphan}


def test_reconcile_reports_each_drift_and_changes_nothing(clients, planted):
    ctms, crm = clients
    before = (by_external_id(crm, INTERACTIONS), by_external_id(ctms, MEDICAL))
    found = reconcile(repair=False)
    assert {key: d["kind"] for key, d in found.items()} == planted["plan"]
    assert all(d["repaired_at"] is None for d in found.values())
    stale = found[("ctms_to_crm", planted["stale"])]["details"]["fields"]
    assert stale == {"subject__v": {"expected": planted["sent"][planted["stale"]]["subject__v"],
                                    "actual": "Edited in CRM"}}
    assert found[("crm_to_ctms", planted["edited"])]["details"]["fields"]["channel__v"]["actual"] == "other__v"
    mark = found[("ctms_to_crm", planted["reverted"])]
    assert mark["details"]["fields"]["subject__v"]["expected"].endswith(" Deleted")
    assert mark["source_id"] == planted["reverted_id"]
    assert found[("crm_to_ctms", planted["orphan"])]["details"]["fields"]["status__v"]["expected"] == "inactive__v"
    # nothing written
    assert (by_external_id(crm, INTERACTIONS), by_external_id(ctms, MEDICAL)) == before
    summary = {r["flow"]: r["summary"]["objects"] for r in Ledger().reconcile_runs("demo", limit=2)}
    assert summary["ctms_to_crm"]["clinical_interaction__v"]["stale"] == 1
    assert summary["crm_to_ctms"]["crm_activity__v"]["missing_deletion_mark"] == 1


def test_reconcile_repairs_then_finds_no_drift(clients, vaults, planted):
    ctms, crm = clients
    _, crm_server = vaults
    found = reconcile(repair=True)
    assert {key: d["kind"] for key, d in found.items()} == planted["plan"]
    assert {key for key, d in found.items() if d["repaired_at"]} == {k for k, kind in planted["plan"].items()
                                                                     if kind != "extra"}
    sent, now_crm = planted["sent"], by_external_id(crm, INTERACTIONS)
    fields = [f for f in sent[planted["missing"]] if f != "id"]
    assert {f: now_crm[planted["missing"]][f] for f in fields} == {f: sent[planted["missing"]][f] for f in fields}
    assert now_crm[planted["stale"]]["subject__v"] == sent[planted["stale"]]["subject__v"]
    for deleted in (planted["reverted"], planted["unsent"]):
        assert now_crm[deleted]["subject__v"] == f"{sent[deleted]['subject__v']} Deleted"
    assert now_crm[planted["extra"]]["subject__v"] == "Nobody's"  # extra: reported, never deleted
    assert rows(crm, "SELECT vault_clinical_status__v FROM clinical_site__v WHERE external_id__v = "
                + vql.quote(planted["site"])) == [{"vault_clinical_status__v": "deleted_in_vault_clinical__v"}]
    medical = by_external_id(ctms, MEDICAL)
    assert medical[planted["edited"]]["channel__v"] == planted["medical"][planted["edited"]]["channel__v"]
    assert medical[planted["orphan"]]["status__v"] == "inactive__v"

    # the next reconcile finds only the extra record; once it is gone, nothing
    assert ({key: d["kind"] for key, d in reconcile(repair=False).items()}
            == {("ctms_to_crm", planted["extra"]): "extra"})
    delete(crm_server, "clinical_interaction__v", now_crm[planted["extra"]]["id"])
    assert reconcile(repair=False) == {}

    # a mark applied by the repair is in the deletion queue: the run that then sees the
    # deletion does not append the suffix a second time
    send("ctms_to_crm__demo", since=now() - timedelta(hours=1))
    assert by_external_id(crm, INTERACTIONS)[planted["unsent"]]["subject__v"] == \
        f"{sent[planted['unsent']]['subject__v']} Deleted"
