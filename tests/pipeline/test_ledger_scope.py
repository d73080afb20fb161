"""The ledger in parts: the scoped views the engine uses, typed outcomes, the flow name length."""
from __future__ import annotations

import inspect
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import String

from clinical_crm.engine import ledger as ledger_module
from clinical_crm.engine.ledger import FLOW_NAME_MAX, IdMap, Ledger, ObjectLedger
from clinical_crm.outcomes import Outcome, RecordResult
from support import PostgresDatabase

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
OBJ = "crm_activity__v"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path):
    if request.param == "sqlite":
        yield Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
        return
    with PostgresDatabase("ledger_scope") as database:
        yield Ledger(database.url)
        ledger_module._ENGINES.pop(database.url).dispose()


def test_the_scoped_view_writes_and_reads_what_the_triple_methods_do(ledger):
    run = ledger.start_run("demo", "ctms_to_crm", "r1", T0, T0)
    mine = ledger.scope("demo", "ctms_to_crm", OBJ)
    other = ledger.scope("demo", "crm_to_ctms", OBJ)  # same object, other flow: kept apart

    mine.quarantine_records(run, {"V1": ["no CRM Account"], "V2": ["bad channel"]})
    mine.add_outcomes(run, [RecordResult("V1", Outcome.QUARANTINED), {"source_id": "V2", "outcome": "quarantined"}])
    ledger.finish_run(run, "success")
    assert sorted(mine.quarantined_ids()) == ["V1", "V2"] == sorted(ledger.quarantined_ids("demo", "ctms_to_crm", OBJ))
    assert mine.accepted_quarantine_ids() == {"V1", "V2"}
    assert other.quarantined_ids() == [] and other.accepted_quarantine_ids() == set()
    assert mine.resolve_quarantine(["V2"]) == 1 and mine.quarantined_ids() == ["V1"]

    mine.record_versions({"V1": T0, "V3": T0 + timedelta(hours=1)}, run_id=run)
    assert mine.loaded_versions(["V1", "V3", "V9"]) == {"V1": T0, "V3": T0 + timedelta(hours=1)}
    assert other.loaded_versions(["V1"]) == {}

    assert mine.queue_deletions([("V4", "G4"), ("V5", "G5")], run_id=run) == 2
    assert mine.queue_deletions([("V4", "G4")]) == 0  # queued before: kept as it is
    mine.expect_deletions({"V4": {"name__v": "x Deleted"}})
    assert [(d["source_id"], d["expected"]) for d in mine.pending_deletions()] == [
        ("V4", {"name__v": "x Deleted"}), ("V5", None)]
    mine.settle_deletions([RecordResult("V4", Outcome.MARKED_DELETED)], no_target=["V5"], run_id=run)
    assert mine.pending_deletions() == [] and other.pending_deletions() == []
    assert {g: e["state"] for g, e in mine.deletion_entries().items()} == {"G4": "applied", "G5": "no_target"}
    assert mine.deletion_entries() == ledger.deletion_entries("demo", "ctms_to_crm", OBJ)

    mine.add_dq_summary(run, 2, 2, {"no CRM Account": 1, "bad channel": 1}, False, None)
    assert [s["failing_rows"] for s in ledger.dq_summaries(run)] == [2]


def test_the_id_map_view(ledger):
    ids = ledger.id_map("demo", "clinical_interaction__v")
    ids.map_ids([RecordResult("V1", Outcome.CREATED, target_id="CI1", external_id="1001_V1"),
                 {"source_id": "V2", "target_id": None, "external_id": "1001_V2"}])
    assert ids.known_external_ids(["1001_V1", "1001_V2", "1001_V3"]) == {"1001_V1"}  # V2 has no target record
    assert ledger.id_map("demo", "account").known_external_ids(["1001_V1"]) == set()
    assert ledger.record_history("demo", "V1")["id_map"][0]["target_id"] == "CI1"


def test_record_results_are_stored_as_their_text(ledger):
    run = ledger.start_run("demo", "ctms_to_crm", "r1", T0, T0)
    scoped = ledger.scope("demo", "ctms_to_crm", OBJ)
    scoped.add_outcomes(run, [RecordResult("V1", Outcome.CREATED, target_id="CI1"),
                              RecordResult("V2", Outcome.FAILED, error_type="INVALID_DATA", message="no"),
                              {"source_id": "V3", "outcome": Outcome.UNKNOWN}])  # a dict holding a member
    assert ledger.written_outcomes(run, [OBJ]) == {OBJ: {"V1": "created", "V3": "unknown"}}
    assert ledger.outcome_count(run, OBJ, Outcome.FAILED) == 1
    [failed] = [o for o in ledger.record_history("demo", "V2")["outcomes"]]
    assert (failed["outcome"], failed["error_type"], failed["message"]) == ("failed", "INVALID_DATA", "no")


def test_each_scoped_operation_is_the_ledgers_own():
    """The views hold no SQL: each of their methods hands over to the Ledger method of its name."""
    for view in (ObjectLedger, IdMap):
        for name, method in inspect.getmembers(view, inspect.isfunction):
            if not name.startswith("_"):
                assert callable(getattr(Ledger, name, None)), name
                assert f"self.ledger.{name}(" in inspect.getsource(method), name


def test_views_are_frozen(tmp_path):
    scoped = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}").scope("demo", "ctms_to_crm", OBJ)
    with pytest.raises(AttributeError):
        scoped.object_name = "other"


def test_flow_name_max_is_the_length_of_every_flow_column():
    """Flow names are validated against FLOW_NAME_MAX: it must be what the columns hold."""
    flow_columns = {f"{t.name}.{c.name}": c.type.length for t in ledger_module.metadata.sorted_tables
                    for c in t.columns if c.name in ("direction", "flow")}
    assert set(flow_columns) == {
        "runs.direction", "record_outcomes.direction", "quarantine.direction", "dq_summaries.direction",
        "source_versions.direction", "deletion_queue.direction", "quarantine_actions.direction",
        "reconcile_runs.flow", "drift.flow"}
    assert all(isinstance(ledger_module.metadata.tables[k.split(".")[0]].c[k.split(".")[1]].type, String)
               for k in flow_columns)
    assert set(flow_columns.values()) == {FLOW_NAME_MAX}


def test_a_migrated_ledger_holds_flow_names_of_flow_name_max(ledger):
    """The migrations, not only the tables here, make the flow columns FLOW_NAME_MAX long."""
    from sqlalchemy import inspect as reflect

    found = {(table, c["name"]): c["type"].length for table in reflect(ledger.engine).get_table_names()
             for c in reflect(ledger.engine).get_columns(table) if c["name"] in ("direction", "flow")}
    assert len(found) == 9 and set(found.values()) == {FLOW_NAME_MAX}
