"""Quarantine reasons (from GX's verdict on the rules) and the ledger's read API."""
from __future__ import annotations

import secrets
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest

from clinical_crm.engine import quality
from clinical_crm.flows import crm_to_ctms, ctms_to_crm
from clinical_crm.engine.ledger import Ledger
from support import sqlite_steps

TODAY = date(2026, 6, 1)


def activities(*rows):
    base = {"id": None, "person__v": "P1", "person__vr.veeva_network_id__c": "N1", "person__vr.id": "P1",
            "activity_date__v": "2026-05-01", "channel__v": "phone__v",
            "study__vr.global_id__sys": "1001_S1", "site__vr.global_id__sys": None}
    return pd.DataFrame([{**base, **r} for r in rows])


ACCOUNTS = pd.DataFrame({"id": ["A1", "A2", "A3"], "veeva_network_id__v": ["N1", "N2", "N2"]})


def verdict_of(checks, rules, object_name="crm_activity__v"):
    """GX's verdict in an ephemeral context (nothing written)."""
    return quality.Validator("unit", "test", stored=False).verdict(object_name, checks, rules)


def reasons_by_id(verdict, ids):
    return {i: [reason for _, reason in verdict.findings.get(i, [])] for i in ids}


def reasons_of(cfg, frame, known_studies=("1001_S1",)):
    checks = ctms_to_crm.activity_checks(frame, {"accounts": ACCOUNTS, "studies": set(known_studies), "sites": set()}, cfg)
    verdict = verdict_of(checks, ctms_to_crm.quality_rules(cfg, today=TODAY))
    return checks, reasons_by_id(verdict, frame["id"]), verdict.per_rule


def test_good_activity_has_no_reason_and_its_account(demo_cfg):
    checks, reasons, per_rule = reasons_of(demo_cfg, activities({"id": "ok"}))
    assert reasons == {"ok": []} and per_rule == {}
    assert checks["account_id"].tolist() == ["A1"]


def test_each_rule_gives_a_readable_reason(demo_cfg):
    frame = activities(
        {"id": "no_person", "person__v": None, "person__vr.veeva_network_id__c": None},
        {"id": "no_identifier", "person__vr.veeva_network_id__c": None},
        {"id": "person_gone", "person__v": "P404", "person__vr.veeva_network_id__c": None, "person__vr.id": None},
        {"id": "no_account", "person__vr.veeva_network_id__c": "N9"},
        {"id": "ambiguous", "person__vr.veeva_network_id__c": "N2"},
        {"id": "bad_channel", "channel__v": "fax__c"},
        {"id": "bad_date", "activity_date__v": "2026-02-30"},
        {"id": "absurd_date", "activity_date__v": "1899-01-01"},
        {"id": "no_study", "study__vr.global_id__sys": "1001_S404"},
    )
    _, reasons, per_rule = reasons_of(demo_cfg, frame)
    assert "no Person on the Clinical Activity" in reasons["no_person"]
    assert reasons["no_identifier"][0] == "Person P1 has no veeva_network_id__c: fill it in on the Person in CTMS"
    # a Person record that no longer exists is named by its id, not reported as "no identifier"
    assert reasons["person_gone"][0] == ("Person P404 does not exist in CTMS (deleted, or not readable by the "
                                         "integration user): set an existing Person on the record")
    assert reasons["no_account"] == ["no CRM Account has veeva_network_id__v = 'N9'"]
    assert reasons["ambiguous"] == ["ambiguous: 2 CRM Accounts have veeva_network_id__v = 'N2'"]
    assert reasons["bad_channel"] == ["channel 'fax__c' is not in the channel map"]
    assert "not a valid date" in reasons["bad_date"][0]
    assert "not a valid date" in reasons["absurd_date"][0]
    assert reasons["no_study"] == ["Study 1001_S404 has no Clinical Study in CRM (not sent yet)"]
    assert len(reasons["no_person"]) >= 2  # a row may have several reasons
    assert per_rule["person_account_match"] == 5


def test_gx_validates_the_same_rules(demo_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    frame = activities({"id": "ok"}, {"id": "bad", "channel__v": "fax__c", "person__vr.veeva_network_id__c": "N2"})
    checks = ctms_to_crm.activity_checks(frame, {"accounts": ACCOUNTS, "studies": {"1001_S1"}, "sites": set()},
                                         demo_cfg)
    validator = quality.Validator("unit", "run1")
    verdict = validator.verdict("crm_activity__v", checks, ctms_to_crm.quality_rules(demo_cfg))
    summaries = {s["suite"]: s for s in verdict.suites}
    assert summaries["mapping_completeness"]["success"] is False
    assert summaries["identifier_match"]["success"] is False
    assert list(verdict.findings) == ["bad"] and verdict.data_docs.endswith("index.html")
    good = checks.loc[checks["source_id"] == "ok"]
    summaries = {s["suite"]: s for s in validator.verdict("crm_activity__v", good, ctms_to_crm.quality_rules(demo_cfg)).suites}
    assert all(s["success"] for s in summaries.values())
    docs = validator.build_docs()
    assert docs.endswith("index.html") and (tmp_path / "unit" / "gx").is_dir()
    from pathlib import Path
    assert Path(docs).is_file()


def test_data_docs_render_only_the_runs_own_results(demo_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    checks = ctms_to_crm.activity_checks(activities({"id": "ok"}),
                                         {"accounts": ACCOUNTS, "studies": {"1001_S1"}, "sites": set()}, demo_cfg)
    site = tmp_path / "unit" / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations"

    def pages(run_key):
        return sorted(site.rglob(f"*/{run_key}/*/*.html"))

    first = quality.Validator("unit", "run1")
    first.verdict("crm_activity__v", checks, ctms_to_crm.quality_rules(demo_cfg))
    first.build_docs()
    built_first = {page: page.stat().st_mtime_ns for page in pages("run1")}
    assert len(built_first) == 2                                   # one page per suite

    second = quality.Validator("unit", "run2")
    second.verdict("crm_activity__v", checks, ctms_to_crm.quality_rules(demo_cfg))
    index = second.build_docs()
    assert len(pages("run2")) == 2
    assert {page: page.stat().st_mtime_ns for page in pages("run1")} == built_first   # not rendered again
    assert "run1" in Path(index).read_text() and "run2" in Path(index).read_text()  # the index lists both


def test_inbound_rules(demo_cfg):
    calls = pd.DataFrame([
        {"id": "ok", "account__v": "A1", "account__vr.veeva_network_id__v": "N1", "call_channel__v": "phone__v",
         "call2_status__v": "saved__v", "call_date__v": "2026-05-01"},
        {"id": "two", "account__v": "A2", "account__vr.veeva_network_id__v": "N2", "call_channel__v": "phone__v",
         "call2_status__v": None, "call_date__v": "2026-05-01"},
    ])
    persons = pd.DataFrame({"id": ["P1", "P2", "P3"], "veeva_network_id__c": ["N1", "N2", "N2"]})
    checks = crm_to_ctms.call_checks(calls, {"persons": persons}, demo_cfg)
    reasons = reasons_by_id(verdict_of(checks, crm_to_ctms.quality_rules(demo_cfg, today=TODAY), "call2__v"), calls["id"])
    assert reasons["ok"] == [] and checks["person_id"].tolist()[0] == "P1"
    assert reasons["two"] == ["status missing", "ambiguous: 2 CTMS Persons have veeva_network_id__c = 'N2'"]


def test_threshold_fails_only_past_the_share():
    quality.check_threshold(4, 1, 0.25)
    quality.check_threshold(0, 0, 0.25)
    with pytest.raises(quality.QualityThresholdExceeded):
        quality.check_threshold(4, 2, 0.25)


# ---------------------------------------------------------------- ledger


@pytest.fixture
def ledger(tmp_path):
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_ledger_answers_what_happened_to_a_record(ledger):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    run1 = ledger.start_run("demo", "ctms_to_crm", "r1", t0, t0 + timedelta(hours=1))
    ledger.quarantine_records(run1, "demo", "ctms_to_crm", "crm_activity__v", {"V1": ["no CRM Account has x = '1'"]})
    ledger.add_outcomes(run1, "demo", "ctms_to_crm", "crm_activity__v",
                        [{"source_id": "V1", "outcome": "quarantined", "message": "no CRM Account"}])
    ledger.finish_run(run1, "success", counts={"crm_activity__v": {"quarantined": 1}})
    assert [q["source_id"] for q in ledger.open_quarantine("demo")] == ["V1"]
    assert ledger.quarantined_ids("demo", "ctms_to_crm", "crm_activity__v") == ["V1"]

    run2 = ledger.start_run("demo", "ctms_to_crm", "r2", t0 + timedelta(hours=1), t0 + timedelta(hours=2))
    ledger.add_outcomes(run2, "demo", "ctms_to_crm", "crm_activity__v",
                        [{"source_id": "V1", "target_id": "CI1", "outcome": "created", "external_id": "1001_V1"}])
    ledger.map_ids("demo", "clinical_interaction__v",
                   [{"source_id": "V1", "target_id": "CI1", "external_id": "1001_V1"}])
    assert ledger.resolve_quarantine("demo", "ctms_to_crm", "crm_activity__v", ["V1"]) == 1
    ledger.finish_run(run2, "success", counts={})

    assert ledger.open_quarantine("demo") == []
    history = ledger.record_history("demo", "V1")
    assert [o["outcome"] for o in history["outcomes"]] == ["quarantined", "created"]
    assert history["outcomes"][1]["window_end"] == (t0 + timedelta(hours=2)).isoformat()
    assert history["quarantine"][0]["resolved_at"] is not None
    assert history["id_map"][0]["target_id"] == "CI1"
    assert ledger.known_external_ids("demo", "clinical_interaction__v", ["1001_V1", "1001_V2"]) == {"1001_V1"}

    runs = ledger.recent_runs("demo")
    assert [r["dag_run_id"] for r in runs] == ["r2", "r1"]
    assert runs[1]["counts"] == {"crm_activity__v": {"quarantined": 1}}
    assert ledger.last_success_end("demo", "ctms_to_crm") == t0 + timedelta(hours=2)
    assert ledger.last_success_end("demo", "crm_to_ctms") is None
    [conn] = ledger.connections()
    assert conn["connection"] == "demo" and conn["open_quarantine"] == 0 and conn["last_run"]["dag_run_id"] == "r2"


def test_failed_runs_do_not_move_the_last_success(ledger):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    ok = ledger.start_run("demo", "crm_to_ctms", "a", t0, t0 + timedelta(hours=1))
    ledger.finish_run(ok, "success")
    bad = ledger.start_run("demo", "crm_to_ctms", "b", t0 + timedelta(hours=1), t0 + timedelta(hours=2))
    ledger.finish_run(bad, "failed", message="VaultAuthenticationError: wrong password")
    assert ledger.last_success_end("demo", "crm_to_ctms") == t0 + timedelta(hours=1)
    assert ledger.recent_runs("demo")[0]["message"].startswith("VaultAuthenticationError")


def test_a_retried_run_reuses_its_row(ledger):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    first = ledger.start_run("demo", "ctms_to_crm", "same", t0, t0)
    assert ledger.start_run("demo", "ctms_to_crm", "same", t0, t0) == first
    assert len(ledger.recent_runs("demo")) == 1


def test_quarantine_of_a_failed_run_is_not_accepted(ledger):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for dag_run, state, source in (("ok", "success", "A"), ("bad", "failed", "B")):
        run = ledger.start_run("demo", "ctms_to_crm", dag_run, t0, t0)
        ledger.quarantine_records(run, "demo", "ctms_to_crm", "crm_activity__v", {source: ["why"]})
        ledger.add_outcomes(run, "demo", "ctms_to_crm", "crm_activity__v",
                            [{"source_id": source, "outcome": "quarantined"}])
        ledger.finish_run(run, state)
    assert ledger.accepted_quarantine_ids("demo", "ctms_to_crm", "crm_activity__v") == {"A"}
    assert set(ledger.quarantined_ids("demo", "ctms_to_crm", "crm_activity__v")) == {"A", "B"}


def test_id_map_batches_cost_the_same_on_a_big_ledger(tmp_path):
    """A batch's id-map lookups read its own rows, not every row of the connection: the cost of
    mapping 500 new records does not grow with the rows already mapped (SQLite VM steps)."""
    import sqlite3

    path = tmp_path / "ledger.db"
    # a ledger made before the connection-only index was dropped: opening it drops the index
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE id_map (id INTEGER PRIMARY KEY, connection VARCHAR(100) NOT NULL, "
                   "object VARCHAR(100) NOT NULL, source_id VARCHAR(255) NOT NULL, target_id VARCHAR(255), "
                   "external_id VARCHAR(255), updated_at DATETIME NOT NULL)")
        for column in ("connection", "source_id", "external_id"):
            db.execute(f"CREATE INDEX ix_id_map_{column} ON id_map ({column})")
    ledger = Ledger(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert "ix_id_map_connection" not in {row[1] for row in db.execute("PRAGMA index_list(id_map)")}
    steps = sqlite_steps(ledger.engine)

    def batch(first: int) -> int:
        rows = [{"source_id": f"V1I{n:013d}", "target_id": f"T{n}", "external_id": f"G_{n}"}
                for n in range(first, first + 500)]
        steps[0] = 0
        ledger.map_ids("bench", "clinical_interaction__v", rows)
        ledger.known_external_ids("bench", "clinical_interaction__v", [r["external_id"] for r in rows])
        return steps[0]

    early = batch(0)
    for first in range(500, 20_000, 500):
        batch(first)
    assert batch(20_000) < 2 * early


def test_old_id_map_index_on_postgresql_dropped_by_the_owner_kept_for_others(caplog):
    """On PostgreSQL only the tables' owner may drop the old index: another role still opens
    the ledger (with a warning) and the owner drops it."""
    import psycopg2
    from sqlalchemy import create_engine, inspect

    from clinical_crm.engine import ledger as ledger_module
    from support import PG, PostgresDatabase

    role = f"ledger_user_{secrets.token_hex(3)}"
    with PostgresDatabase("ledger_ci") as database:
        ledger_module.metadata.create_all(create_engine(database.url))
        conn = psycopg2.connect(dbname=database.name, **PG)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE INDEX ix_id_map_connection ON id_map (connection)")
            cur.execute(f"CREATE ROLE {role} LOGIN")
            cur.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        try:
            other_url = database.url.replace(f"{PG['user']}@", f"{role}@")
            with caplog.at_level("WARNING", logger="clinical_crm.engine.migrations"):
                assert Ledger(other_url).recent_runs() == []
            assert "could not upgrade the ledger schema" in caplog.text

            def indexes() -> set[str]:
                return {i["name"] for i in inspect(create_engine(database.url)).get_indexes("id_map")}

            assert "ix_id_map_connection" in indexes()
            Ledger(database.url)
            assert "ix_id_map_connection" not in indexes()
        finally:
            for url in list(ledger_module._ENGINES):
                if database.name in url:
                    ledger_module._ENGINES.pop(url).dispose()
            with conn.cursor() as cur:
                cur.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
            conn.close()
            database._admin(f"DROP ROLE IF EXISTS {role}")


# ---------------------------------------------------------------- quarantine triage (the page)


def test_ignored_records_are_closed_for_good_and_retried_ones_are_read_again(ledger):
    run = ledger.start_run("demo", "ctms_to_crm", "r1", None, None)
    ledger.quarantine_records(run, "demo", "ctms_to_crm", "crm_activity__v", {"V1": ["bad"], "V2": ["bad"]})
    v1, v2 = (q["id"] for q in ledger.open_quarantine("demo"))

    ignored = ledger.act_on_quarantine(v1, "ignore", "alice", reason="test record, never to be sent")
    assert ignored["resolved_at"] is not None
    assert ledger.quarantined_ids("demo", "ctms_to_crm", "crm_activity__v") == ["V2"]  # the runner re-reads V2 only
    assert ledger.act_on_quarantine(v2, "retry", "bob")["resolved_at"] is None  # stays open: read again
    assert ledger.act_on_quarantine(v1, "retry", "carol")["resolved_at"] is None  # reopened
    assert sorted(ledger.quarantined_ids("demo", "ctms_to_crm", "crm_activity__v")) == ["V1", "V2"]

    actions = ledger.record_history("demo", "V1")["actions"]
    assert [(a["action"], a["actor"], a["reason"]) for a in actions] == [
        ("ignore", "alice", "test record, never to be sent"), ("retry", "carol", None)]
    with pytest.raises(ValueError):
        ledger.act_on_quarantine(v1, "delete", "mallory")
    with pytest.raises(KeyError):
        ledger.act_on_quarantine(999, "ignore", "alice")


def test_quarantine_triage_filters_by_object_rule_and_age(ledger):
    run = ledger.start_run("demo", "ctms_to_crm", "r1", None, None)
    ledger.quarantine_records(run, "demo", "ctms_to_crm", "crm_activity__v",
                              {"V1": ["no CRM account for person P1"], "V2": ['channel "fax" 100% unknown']})
    ledger.quarantine_records(run, "demo", "crm_to_ctms", "call2__v", {"C1": ["no CRM account for person P9"]})
    from clinical_crm.engine import ledger as ledger_module
    from sqlalchemy import update

    with ledger.engine.begin() as db:  # V1 was first held ten days ago
        db.execute(update(ledger_module.quarantine).where(ledger_module.quarantine.c.source_id == "V1")
                   .values(first_seen=datetime.now(timezone.utc) - timedelta(days=10)))

    def ids(**filters):
        return [q["source_id"] for q in ledger.quarantine_page("demo", **filters)]

    assert ids() == ["V1", "V2", "C1"]
    assert ids(object_name="call2__v") == ["C1"]
    assert ids(rule="no CRM account") == ["V1", "C1"]
    assert ids(rule='"fax" 100%') == ["V2"]  # quotes and LIKE wildcards match as text
    assert ids(rule="100_") == []
    assert ids(min_age_days=7) == ["V1"]
    assert ledger.count_quarantine("demo", rule="no CRM account", object_name="crm_activity__v") == 1
    assert ledger.quarantine_objects("demo") == ["call2__v", "crm_activity__v"]


def test_quarantine_pages_in_sql_at_100000_open_rows(ledger):
    """Paging and export read a page or a chunk per query from the database, never the whole set."""
    from sqlalchemy import event, insert

    from clinical_crm.engine import ledger as ledger_module

    now = datetime.now(timezone.utc)
    rows = [dict(connection="demo", direction="ctms_to_crm", object="crm_activity__v", source_id=f"V{i:06d}",
                 reasons=["no CRM account"], first_seen=now, last_seen=now) for i in range(100_000)]
    with ledger.engine.begin() as db:
        db.execute(insert(ledger_module.quarantine), rows)
    statements: list[str] = []
    fetched: list[int] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    event.listen(ledger.engine, "after_cursor_execute", seen)
    try:
        page = ledger.quarantine_page("demo", limit=50, offset=99_950)
        assert [q["source_id"] for q in page] == [f"V{i:06d}" for i in range(99_950, 100_000)]
        [select_page] = [s for s in statements if "FROM quarantine" in s]
        assert "LIMIT" in select_page and "OFFSET" in select_page
        assert ledger.count_quarantine("demo") == 100_000
        statements.clear()
        for chunk_start, _row in enumerate(ledger.iter_quarantine("demo", chunk=10_000)):
            if chunk_start % 10_000 == 0:
                fetched.append(len(statements))
        selects = [s for s in statements if "FROM quarantine" in s]
        assert len(selects) == 11 and all("LIMIT" in s for s in selects)  # 10 full chunks and an empty one
        assert fetched == list(range(1, 11))  # each chunk read when the export reaches it
    finally:
        event.remove(ledger.engine, "after_cursor_execute", seen)
