"""Bad input: every kind of bad source record of bad_input.CASES (one row each, both directions)
is written into the source vault next to 200 good records per direction; both DAGs run; each bad
record is quarantined with its specific reason, loaded correctly, or (not flagged) not sent, as its
row says; the good records end exactly as in a run without the bad ones; nothing crashes.
"""
from __future__ import annotations

import json
import sqlite3
from datetime import date, datetime, timezone

import pytest

import harness
from bad_input import CASES, IN, OUT, Case

pytestmark = pytest.mark.usefixtures("airflow_db")

MISSING_ID = "V0Z0000009999999"


class SourceWriter:
    """Writes the corpus into the two vaults of a running world."""

    def __init__(self, world):
        from clinical_crm.vault.client import VaultClient

        self.world = world
        self.ctms = VaultClient(world.ctms.url, harness.USER, harness.PASSWORD)
        self.crm = VaultClient(world.crm.url, harness.USER, harness.PASSWORD)

    def close(self):
        self.ctms.close()
        self.crm.close()

    # -- helpers ------------------------------------------------------------------------------

    def create(self, client, obj: str, record: dict) -> str:
        out = client.create(obj, [record])[0]
        assert out.outcome == "created", (obj, record, out)
        return out.id

    def first(self, client, vql: str) -> dict:
        return next(r for page in client.query(vql) for r in page.records)

    def sqlite_insert(self, app: str, obj: str, row: dict, created_by: str | None = None,
                      object_type: str | None = None) -> str:
        from vault_sandbox.db import Store
        from vault_sandbox.models import load_model
        from vault_sandbox.seed import _Loader

        store = Store(load_model(app), str(self.world.folder / f"{app}.db"))
        try:
            with store.engine.begin() as conn:
                users = store.table("user__sys")
                integration = conn.execute(users.select().with_only_columns(users.c.id)
                                           .where(users.c.username__sys == harness.USER)).scalar()
                loader = _Loader(store, conn)
                now = datetime.now(timezone.utc)
                return loader.insert(obj, [row], created_by=created_by or integration, stamps=[(now, now)],
                                     object_type=object_type)[0]
        finally:
            store.engine.dispose()

    def delete(self, client, obj: str, record_id: str) -> None:
        response = client._call("DELETE", f"vobjects/{obj}/{record_id}", "write")
        assert response.status == "SUCCESS", response.body

    # -- one case -----------------------------------------------------------------------------

    def write(self, case: Case, index: int, base: dict) -> dict:
        outbound = case.direction == OUT
        client, app = (self.ctms, "ctms") if outbound else (self.crm, "crm")
        obj = "crm_activity__v" if outbound else "call2__v"
        subject_field = "subject__v"
        record = dict(base[case.direction])
        record[subject_field] = f"Bad input {index}: {case.kind}"
        record.update(case.record)
        via = "api"
        if case.person:   # OUT: a new Person (and its twin Accounts in CRM)
            record["person__v"] = self.create(self.ctms, "person__sys", case.person)
            for t in range(case.twins):
                self.create(self.crm, "account__v", {"name__v": f"Twin {t}", "last_name__v": "Twin",
                                                    "veeva_network_id__v": case.person["veeva_network_id__c"]})
        if case.account:  # IN: a new Account (and its twin Persons in CTMS)
            record["account__v"] = self.create(self.crm, "account__v", {"name__v": case.account["last_name__v"],
                                                                       **case.account})
            for t in range(case.twins):
                self.create(self.ctms, "person__sys", {"last_name__sys": f"Twin {t}",
                                                      "veeva_network_id__c": case.account["veeva_network_id__v"]})
        if case.deleted:  # a referenced record deleted before the run
            target_obj, fields = {
                "person__v": ("person__sys", {"last_name__sys": "Soon Deleted",
                                              "veeva_network_id__c": base["identifier"]}),
                "study__v": ("study__v", {"name__v": f"Deleted study {index}", "study_title__v": "Gone"}),
                "site__v": ("site__v", {"name__v": f"Deleted site {index}", "study__v": base[OUT]["study__v"],
                                        "site_name__v": "Gone"}),
                "account__v": ("account__v", {"name__v": "Soon Deleted", "last_name__v": "Deleted",
                                              "veeva_network_id__v": base["identifier"]}),
            }[case.deleted]
            referenced = self.create(client, target_obj, fields)
            record[case.deleted] = referenced
        creator = None
        if case.creator:
            creator = self.sqlite_insert(app, "user__sys", {**case.creator, "name__v": "x",
                                                            "username__sys": f"bad{index}@example.org",
                                                            "security_profile__sys": "no_access__c"})
        if case.dangling == "created_by__v":
            creator = MISSING_ID
        elif case.dangling:
            record[case.dangling] = MISSING_ID
        if creator or case.dangling or case.force_sqlite:
            via = "sqlite"
        else:
            body = dict(record)
            if outbound:
                body["object_type__vr.api_name__v"] = "clinical_activity__v"
            out = client.create(obj, [body])[0]
            if out.outcome == "created":
                source_id = out.id
            else:
                via = f"sqlite (API refused: {out.error_type})"
        if via != "api":
            source_id = self.sqlite_insert(app, obj, record, created_by=creator,
                                           object_type="clinical_activity__v" if outbound else None)
        if case.deleted:
            self.delete(client, {"person__v": "person__sys", "study__v": "study__v", "site__v": "site__v",
                                 "account__v": "account__v"}[case.deleted], record[case.deleted])
        vault_id = "1001" if outbound else "2002"
        return {"source_id": source_id, "global_id": f"{vault_id}_{source_id}", "via": via}


def base_records(writer: SourceWriter) -> dict:
    person = writer.first(writer.ctms, "SELECT id, veeva_network_id__c FROM person__sys "
                                       "WHERE veeva_network_id__c != null ORDER BY id ASC")
    account = writer.first(writer.crm, "SELECT id FROM account__v WHERE veeva_network_id__v = '"
                                       + person["veeva_network_id__c"] + "'")
    site = writer.first(writer.ctms, "SELECT id, study__v FROM site__v ORDER BY id ASC")
    today = date.today().isoformat()
    return {
        "identifier": person["veeva_network_id__c"],
        OUT: {"person__v": person["id"], "activity_date__v": today, "channel__v": "phone__v", "complete__v": True,
              "study__v": site["study__v"], "site__v": site["id"]},
        IN: {"account__v": account["id"], "call_date__v": today, "call_channel__v": "phone__v",
             "call2_status__v": "submitted__v", "send_to_vault_clinical__v": True},
    }


def target_row(folder, case: Case, global_id: str) -> dict | None:
    app, table = ("crm", "clinical_interaction__v") if case.direction == OUT else ("ctms", "crm_activity__v")
    conn = sqlite3.connect(f"file:{folder / (app + '.db')}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(f"SELECT * FROM {table} WHERE external_id__v = ?", (global_id,)).fetchall()
    finally:
        conn.close()
    assert len(rows) <= 1, f"{case.kind}: {len(rows)} target records"
    if not rows:
        return None
    row = dict(rows[0])
    if "complete__v" in row and row["complete__v"] is not None:
        row["complete__v"] = bool(row["complete__v"])
    return row


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, airflow_db):
    base = tmp_path_factory.mktemp("bad_input")
    seed = harness.seed_world(base / "seed", 200)
    window = harness.wide_window()
    # reference: the good records alone
    reference = harness.copy_world(seed, base / "reference")
    with harness.World(reference) as world:
        states = world.run_both(window)
    assert all(state == "success" for state, _ in states.values()), states
    # the same good records plus the corpus
    folder = harness.copy_world(seed, base / "corpus")
    results = {}
    with harness.World(folder) as world:
        writer = SourceWriter(world)
        try:
            bases = base_records(writer)
            for index, case in enumerate(CASES):
                results[case.kind] = writer.write(case, index, bases)
        finally:
            writer.close()
        states = world.run_both(harness.wide_window())
        quarantine = {q["source_id"]: q["reasons"] for q in world.ledger().open_quarantine("demo")}
        runs = world.ledger().recent_runs("demo", limit=5)
    return {"folder": folder, "reference": reference, "results": results, "states": states,
            "quarantine": quarantine, "runs": runs}


def test_corpus_has_at_least_40_kinds_in_both_directions():
    assert len({c.kind for c in CASES}) == len(CASES) >= 40
    assert sum(c.direction == OUT for c in CASES) >= 20 and sum(c.direction == IN for c in CASES) >= 20


def test_nothing_crashes(corpus_run):
    for dag_id, (state, tries) in corpus_run["states"].items():
        assert state == "success", (dag_id, tries, corpus_run["runs"])
        assert all(t == 1 for t in tries.values()), (dag_id, tries)


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_each_kind_has_its_outcome(corpus_run, case):
    written = corpus_run["results"][case.kind]
    row = target_row(corpus_run["folder"], case, written["global_id"])
    reasons = corpus_run["quarantine"].get(written["source_id"])
    if case.expect == "quarantined":
        assert reasons, f"{case.kind}: not quarantined (target: {row is not None})"
        assert any(case.reason in r for r in reasons), (case.kind, reasons)
        assert row is None, f"{case.kind}: quarantined but also loaded"
    elif case.expect == "not_sent":
        assert row is None and not reasons, (case.kind, reasons)
    else:
        assert not reasons, (case.kind, reasons)
        assert row is not None, f"{case.kind}: not loaded"
        for name, expected in case.target.items():
            assert row[name] == expected, (case.kind, name, row[name], expected)


def test_good_records_are_unaffected(corpus_run):
    for app in ("ctms", "crm"):
        reference = harness.snapshot(corpus_run["reference"] / f"{app}.db")
        actual = harness.snapshot(corpus_run["folder"] / f"{app}.db")
        for table, rows in reference.items():
            missing = rows - actual[table]
            assert not missing, (app, table, list(missing)[:2])
    counts = {r["direction"]: r["counts"] for r in corpus_run["runs"]}
    assert counts[OUT]["crm_activity__v"]["loaded"] >= 200
    assert counts[IN]["call2__v"]["loaded"] >= 200


def test_outcome_table(corpus_run, tmp_path_factory):
    """The table the README quotes (printed; also written next to the run)."""
    lines = []
    for case in CASES:
        written = corpus_run["results"][case.kind]
        reasons = corpus_run["quarantine"].get(written["source_id"]) or []
        row = target_row(corpus_run["folder"], case, written["global_id"])
        outcome = "quarantined" if reasons else ("loaded" if row else "not sent")
        lines.append({"kind": case.kind, "direction": case.direction, "via": written["via"], "outcome": outcome,
                      "reason": "; ".join(reasons)[:160]})
    (corpus_run["folder"] / "bad_input_outcomes.json").write_text(json.dumps(lines, indent=1, ensure_ascii=False))
    print("\n" + "\n".join(f"{x['direction']:12} {x['kind']:45} {x['via'][:34]:34} {x['outcome']:12} {x['reason']}"
                           for x in lines))
    assert len(lines) >= 40
