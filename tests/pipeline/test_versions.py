"""No lost updates: source versions in the ledger and the load's version check (issue 7).

A record is not written when the ledger knows that a NEWER version of it (its source
`modified_date__v`) was already written by another run; equal and newer versions are written.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import create_engine, inspect, text as sql

from clinical_crm.engine import ledger as ledger_module
from clinical_crm.engine import load, runner, staging
from clinical_crm.engine.context import RunContext
from clinical_crm.flows import crm_to_ctms, ctms_to_crm
from clinical_crm.vault import RecordOutcome
from clinical_crm.vault.fields import vault_datetime
from clinical_crm.engine.ledger import Ledger

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
OBJ = "crm_activity__v"


@pytest.fixture
def ledger(tmp_path):
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


# ---------------------------------------------------------------- ledger


def test_record_versions_keeps_the_newest(ledger):
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0, "V2": T0})
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0 + timedelta(seconds=1), "V2": T0 - timedelta(hours=1)})
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, ["V1", "V2", "V3"]) == {
        "V1": T0 + timedelta(seconds=1), "V2": T0}


def test_versions_are_per_connection_direction_and_object(ledger):
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0})
    assert ledger.loaded_versions("other", "ctms_to_crm", OBJ, ["V1"]) == {}
    assert ledger.loaded_versions("demo", "crm_to_ctms", OBJ, ["V1"]) == {}
    assert ledger.loaded_versions("demo", "ctms_to_crm", "study__v", ["V1"]) == {}


def test_versions_compare_in_utc(ledger):
    paris = timezone(timedelta(hours=1))
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": datetime(2026, 11, 25, 11, 0, 5, tzinfo=paris)})
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": datetime(2026, 11, 25, 10, 0, 3)})  # naive = UTC: older
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, ["V1"]) == {"V1": T0 + timedelta(seconds=5)}


def test_many_versions_at_once(ledger):
    versions = {f"V{i}": T0 + timedelta(seconds=i) for i in range(1200)}
    ledger.record_versions("demo", "ctms_to_crm", OBJ, versions)
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {k: v + timedelta(seconds=1) for k, v in versions.items()})
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, versions) == {
        k: v + timedelta(seconds=1) for k, v in versions.items()}


def test_an_insert_lost_to_another_load_is_retried_as_an_update(ledger, monkeypatch):
    """Two loads insert the same record's first version at once: the loser retries and keeps the max."""
    real = Ledger._record_versions
    calls = []

    def racing(self, connection, direction, object_name, versions, run_id):
        calls.append(1)
        if len(calls) == 1:  # the other load's insert lands between our read and our insert
            real(Ledger(self.url), connection, direction, object_name, {"V1": T0 + timedelta(seconds=9)}, 7)
            from sqlalchemy.exc import IntegrityError

            raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
        return real(self, connection, direction, object_name, versions, run_id)

    monkeypatch.setattr(Ledger, "_record_versions", racing)
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0 + timedelta(seconds=3)}, run_id=8)
    assert len(calls) == 2
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, ["V1"]) == {"V1": T0 + timedelta(seconds=9)}


def test_unique_per_record(ledger):
    unique = [c["column_names"] for c in inspect(ledger.engine).get_unique_constraints("source_versions")]
    assert ["connection", "direction", "object", "source_id"] in unique


def test_a_ledger_created_before_versions_gets_the_table(tmp_path):
    """Existing ledger databases keep working: the new table is added, the old tables untouched."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Ledger(url)
    run = old.start_run("demo", "ctms_to_crm", "r1", T0, T0)
    with old.engine.begin() as db:  # as a ledger made before versions and before Alembic
        for table in ("source_versions", "deletion_queue", "clinical_crm_ledger_version"):
            db.execute(sql(f"DROP TABLE {table}"))
    old.engine.dispose()
    ledger_module._ENGINES.pop(url)
    assert "source_versions" not in inspect(old.engine).get_table_names()

    again = Ledger(url)
    assert "source_versions" in inspect(again.engine).get_table_names()
    assert again.run(run)["dag_run_id"] == "r1"
    again.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0}, run_id=run)
    assert again.loaded_versions("demo", "ctms_to_crm", OBJ, ["V1"]) == {"V1": T0}


def test_a_ledger_made_by_the_code_before_alembic_upgrades_in_place(tmp_path):
    """tests/fixtures/ledger_before_alembic.db was written by the ledger code of commit cc28777
    (no Alembic, the old id_map index): opened now, it is upgraded in place, keeps every row,
    and its deletion marks already written are in the deletion queue as applied."""
    import shutil

    from clinical_crm.engine import migrations

    copy = tmp_path / "ledger.db"
    shutil.copy(Path(__file__).parents[1] / "fixtures" / "ledger_before_alembic.db", copy)
    ledger = Ledger(f"sqlite:///{copy}")
    assert migrations.current(ledger.engine) == migrations.head()
    tables = set(inspect(ledger.engine).get_table_names())
    assert {"runs", "record_outcomes", "quarantine", "id_map", "dq_summaries", "source_versions",
            "deletion_queue", "clinical_crm_ledger_version"} <= tables
    assert "ix_id_map_connection" not in {i["name"] for i in inspect(ledger.engine).get_indexes("id_map")}
    [run] = ledger.recent_runs("demo")
    assert run["state"] == "success" and run["counts"] == {"crm_activity__v": {"extracted": 3}}
    # 0005 added runs.reference_prefix to the old table: empty for the runs recorded before
    assert "reference_prefix" in {c["name"] for c in inspect(ledger.engine).get_columns("runs")}
    assert run["reference_prefix"] is None
    history = ledger.record_history("demo", "V1A1")
    assert history["id_map"][0]["target_id"] == "T1" and history["versions"][0]["modified_date"] == T0.isoformat()
    assert [q["source_id"] for q in ledger.open_quarantine("demo")] == ["V1A3"]
    assert ledger.pending_deletions("demo", "ctms_to_crm", OBJ) == []
    # marked before: never again
    assert ledger.queue_deletions("demo", "ctms_to_crm", OBJ, [("V1A2", "1001_V1A2")]) == 0


def test_a_ledger_beside_airflows_own_alembic_revision(tmp_path):
    """The ledger may share a database with Airflow's metadata (compose, the Celery test): Airflow's
    alembic_version holds a revision the ledger does not know, and must not matter."""
    from clinical_crm.engine import migrations

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with create_engine(url).begin() as db:
        db.execute(sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"))
        db.execute(sql("INSERT INTO alembic_version VALUES ('29ce7909c52b')"))
    ledger = Ledger(url)
    assert migrations.current(ledger.engine) == migrations.head()
    with ledger.engine.connect() as db:
        assert db.execute(sql("SELECT version_num FROM alembic_version")).scalar() == "29ce7909c52b"


def test_record_history_shows_the_version_sent(ledger):
    run = ledger.start_run("demo", "ctms_to_crm", "r1", T0, T0)
    ledger.add_outcomes(run, "demo", "ctms_to_crm", OBJ, [
        {"source_id": "V1", "outcome": "superseded",
         "message": "a newer version (modified 2026-11-25T10:00:05.000Z) was already sent"}])
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0 + timedelta(seconds=5)}, run_id=run)
    history = ledger.record_history("demo", "V1")
    assert history["outcomes"][0]["outcome"] == "superseded"
    assert history["versions"] == [{"direction": "ctms_to_crm", "object": OBJ,
                                    "modified_date": (T0 + timedelta(seconds=5)).isoformat(), "run_id": run,
                                    "updated_at": history["versions"][0]["updated_at"]}]


# ---------------------------------------------------------------- load


class FakeVault:
    """Remembers every upsert call; each record is `updated`, unless its subject says `fail`."""

    def __init__(self):
        self.calls: list[list[dict]] = []

    def retrying(self):
        import tenacity

        return tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True)

    def upsert(self, object_name, records, id_param, batch_size=500, retry=True):
        self.calls.append([dict(r) for r in records])
        return [RecordOutcome(i, f"T{r[id_param]}", "failed" if r.get("subject__v") == "fail" else "updated",
                              "INVALID_DATA" if r.get("subject__v") == "fail" else None, None)
                for i, r in enumerate(records)]


def rec(source: str, modified: str | None, subject: str = "s") -> dict:
    return {"_source_id": source, "_source_version": modified, "external_id__v": f"1001_{source}",
            "subject__v": subject}


def vault_text(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def test_parse_version():
    assert load.parse_version("2026-11-25T10:00:00.000Z") == T0
    assert load.parse_version(None) is None and load.parse_version("") is None
    assert load.parse_version("not a date") is None
    assert vault_datetime(T0 + timedelta(milliseconds=250)) == "2026-11-25T10:00:00.250Z"


def test_an_older_version_is_not_written(ledger):
    guard = load.VersionGuard(ledger, "demo", "ctms_to_crm", OBJ, run_id=1)
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"OLD": T0 + timedelta(minutes=5), "SAME": T0,
                                                        "NEW": T0 - timedelta(minutes=5)})
    vault = FakeVault()
    outcomes = load.upsert(vault, "clinical_interaction__v", [
        rec("OLD", vault_text(T0)), rec("SAME", vault_text(T0)), rec("NEW", vault_text(T0)),
        rec("FIRST", vault_text(T0)), rec("NOVERSION", None)], "external_id__v", 500, guard=guard)
    by_source = {o["source_id"]: o for o in outcomes}
    assert by_source["OLD"]["outcome"] == "superseded"
    assert by_source["OLD"]["target_id"] is None and by_source["OLD"]["external_id"] == "1001_OLD"
    assert by_source["OLD"]["message"] == (
        "a newer version (modified 2026-11-25T10:05:00.000Z) was already sent; "
        "this run's older version (modified 2026-11-25T10:00:00.000Z) was not written")
    assert {s: o["outcome"] for s, o in by_source.items() if s != "OLD"} == dict.fromkeys(
        ["SAME", "NEW", "FIRST", "NOVERSION"], "updated")
    # one call without the superseded record; the carried source id and version are never sent
    [sent] = vault.calls
    assert [r["external_id__v"] for r in sent] == ["1001_SAME", "1001_NEW", "1001_FIRST", "1001_NOVERSION"]
    assert all("_source_id" not in r and "_source_version" not in r for r in sent)
    # the versions written are recorded (the newer one kept for OLD); none for a record without one
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, ["OLD", "SAME", "NEW", "FIRST", "NOVERSION"]) == {
        "OLD": T0 + timedelta(minutes=5), "SAME": T0, "NEW": T0, "FIRST": T0}
    assert load.tally(outcomes) == {"superseded": 1, "updated": 4, "loaded": 4}


def test_failed_writes_record_no_version(ledger):
    guard = load.VersionGuard(ledger, "demo", "ctms_to_crm", OBJ)
    outcomes = load.upsert(FakeVault(), "clinical_interaction__v", [rec("A", vault_text(T0), "fail")],
                           "external_id__v", 500, guard=guard)
    assert outcomes[0]["outcome"] == "failed"
    assert ledger.loaded_versions("demo", "ctms_to_crm", OBJ, ["A"]) == {}


def test_a_batch_of_superseded_records_makes_no_call(ledger):
    guard = load.VersionGuard(ledger, "demo", "ctms_to_crm", OBJ)
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {f"V{i}": T0 + timedelta(hours=1) for i in range(4)})
    vault = FakeVault()
    outcomes = load.upsert(vault, "clinical_interaction__v", [rec(f"V{i}", vault_text(T0)) for i in range(6)],
                           "external_id__v", 2, guard=guard)
    assert [len(c) for c in vault.calls] == [2]  # batches V0-V1 and V2-V3 dropped whole, V4-V5 sent
    assert [o["outcome"] for o in outcomes] == ["superseded"] * 4 + ["updated"] * 2


def test_the_check_runs_per_batch_right_before_its_call(ledger):
    """A newer version recorded while earlier batches are written still stops a later batch."""
    guard = load.VersionGuard(ledger, "demo", "ctms_to_crm", OBJ)

    class Interleaved(FakeVault):
        def upsert(self, object_name, records, id_param, batch_size=500, retry=True):
            if not self.calls:  # another run sends a newer V3 while our first batch is written
                ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V3": T0 + timedelta(seconds=1)})
            return super().upsert(object_name, records, id_param, batch_size)

    outcomes = load.upsert(Interleaved(), "clinical_interaction__v", [rec(f"V{i}", vault_text(T0)) for i in range(4)],
                           "external_id__v", 2, guard=guard)
    assert {o["source_id"]: o["outcome"] for o in outcomes} == {"V0": "updated", "V1": "updated", "V2": "updated",
                                                                "V3": "superseded"}


def test_without_a_guard_nothing_is_checked(ledger):
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"A": T0 + timedelta(hours=1)})
    vault = FakeVault()
    outcomes = load.upsert(vault, "clinical_interaction__v", [rec("A", vault_text(T0))], "external_id__v", 500)
    assert outcomes[0]["outcome"] == "updated" and "_source_version" not in vault.calls[0][0]


def test_pipeline_load_records_superseded_outcomes_and_counts(ledger, tmp_path, demo_cfg):
    run = RunContext("demo", "ctms_to_crm", "backfill", T0.isoformat(), T0.isoformat(), True, str(tmp_path),
                     ledger.start_run("demo", "ctms_to_crm", "backfill", T0, T0))
    interactions = next(t for t in ctms_to_crm.build(demo_cfg).targets if t.records == "clinical_interactions")
    ledger.record_versions("demo", "ctms_to_crm", OBJ, {"V1": T0 + timedelta(minutes=1)})
    staged = staging.write_frames(f"file://{tmp_path}/clinical_interactions.records.parquet",
                                  [pd.DataFrame([rec("V1", vault_text(T0)), rec("V2", vault_text(T0))])])
    totals = runner._load_target(ledger, run, FakeVault(), demo_cfg, interactions, staged.path)
    assert totals["superseded"] == 1 and totals["updated"] == 1 and totals["loaded"] == 1
    history = ledger.record_history("demo", "V1")
    assert [o["outcome"] for o in history["outcomes"]] == ["superseded"]
    assert history["id_map"] == []  # superseded: not mapped by this run (the run that wrote it maps it)
    assert ledger.record_history("demo", "V2")["id_map"][0]["target_id"] == "T1001_V2"
    assert "superseded" in runner.LOAD_OUTCOMES  # a retried load clears them before writing again


# ---------------------------------------------------------------- extract and transform carry the version


def test_every_source_query_selects_the_version(demo_cfg):
    for query in (ctms_to_crm.clinical_activity_query(demo_cfg), ctms_to_crm.study_query(demo_cfg),
                  ctms_to_crm.site_query(demo_cfg), crm_to_ctms.call_query(demo_cfg)):
        assert "modified_date__v" in query.columns, query.statement


def test_studies_and_sites_carry_their_version(demo_cfg):
    row = {"id": "S1", "global_id__sys": "1001_S1", "modified_date__v": "2026-11-25T10:00:00.000Z", "name__v": "S"}
    [study] = ctms_to_crm.clinical_studies(pd.DataFrame([row]), demo_cfg)
    [site] = ctms_to_crm.clinical_sites(pd.DataFrame([row]), demo_cfg)
    assert study["_source_version"] == site["_source_version"] == "2026-11-25T10:00:00.000Z"
    assert study["_source_id"] == "S1"
