"""Retention and housekeeping (engine/housekeeping.py): old history goes, and nothing still
needed does (open quarantine, queued deletion marks, the id map, the source versions,
reconciliation's latest run); the hot ledger queries read indexes on PostgreSQL (EXPLAIN)."""
from __future__ import annotations

import os
import re
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, text, update

from clinical_crm.engine import housekeeping, quality
from clinical_crm.engine.ledger import (Ledger, deletion_queue, dq_summaries, drift, id_map, quarantine,
                                        reconcile_runs, record_outcomes, runs, source_versions)

from support import PostgresDatabase

DAY = 86400
FLOW, OBJECT = "ctms_to_crm", "activity__v"


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("CLINICAL_CRM_STAGING_URL", f"file://{tmp_path / 'staging'}")
    return tmp_path


def _aged(path: Path, days: float) -> None:
    """Set the modification time of a file or a folder and all it holds to `days` ago."""
    stamp = time.time() - days * DAY
    for p in [*path.rglob("*"), path] if path.is_dir() else [path]:
        os.utime(p, (stamp, stamp))


def _run(ledger: Ledger, name: str, days_ago: float, state: str = "success") -> int:
    end = datetime.now(timezone.utc) - timedelta(days=days_ago)
    run_id = ledger.start_run("demo", FLOW, name, end - timedelta(hours=1), end)
    ledger.finish_run(run_id, state, counts={"loaded": 1})
    with ledger.engine.begin() as db:
        db.execute(update(runs).where(runs.c.id == run_id).values(started_at=end, ended_at=end))
    return run_id


def _gx_run(root: Path, run_name: str, days_ago: float) -> None:
    """A stored validation result and its Data Docs page, laid out as GX lays them out."""
    stamp = (datetime.now(timezone.utc) - timedelta(days=days_ago)).strftime("%Y%m%dT%H%M%S.%fZ")
    for base, suffix in ((quality.RESULTS, ".json"), (quality.PAGES, ".html")):
        path = root / base / "demo" / OBJECT / "completeness" / run_name / stamp / f"batch{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        _aged(root / base / "demo" / OBJECT / "completeness" / run_name, days_ago)


def _count(ledger: Ledger, table) -> int:
    with ledger.engine.connect() as db:
        return int(db.execute(select(func.count()).select_from(table)).scalar() or 0)


def test_retention_removes_old_history_and_nothing_still_needed(places, demo_cfg, tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    old, recent = _run(ledger, "old", 200), _run(ledger, "recent", 1)
    scope = ledger.scope("demo", FLOW, OBJECT)
    # the old run: a record still quarantined (open), one whose deletion mark is queued, one
    # whose quarantine was resolved since, and one plainly loaded
    scope.add_outcomes(old, [{"source_id": "held", "outcome": "quarantined"},
                             {"source_id": "marked", "outcome": "source_deleted"},
                             {"source_id": "fixed", "outcome": "quarantined"},
                             {"source_id": "loaded", "outcome": "created", "target_id": "T1"}])
    scope.add_dq_summary(old, 4, 2, {"missing": 2}, True, None)
    scope.quarantine_records(old, {"held": ["missing subject"], "fixed": ["missing subject"]})
    scope.resolve_quarantine(["fixed"])
    scope.queue_deletions([("marked", "G1")], run_id=old)
    ledger.id_map("demo", "call2__v").map_ids([{"source_id": "loaded", "target_id": "T1", "external_id": "X1"}])
    scope.record_versions({"loaded": datetime.now(timezone.utc) - timedelta(days=200)}, run_id=old)
    # held for months and read again by every run: only its recent outcome is needed
    scope.add_outcomes(old, [{"source_id": "long held", "outcome": "quarantined"}])
    scope.quarantine_records(old, {"long held": ["missing subject"]})
    scope.add_outcomes(recent, [{"source_id": "new", "outcome": "created", "target_id": "T2"},
                                {"source_id": "long held", "outcome": "quarantined"}])
    scope.quarantine_records(recent, {"long held": ["missing subject"]})
    assert scope.accepted_quarantine_ids() == {"held", "long held"}
    last_end = ledger.last_success_end("demo", FLOW)
    # two old reconciliations of the flow: the latest one's drift stays, whatever its age
    reconciles = []
    for _ in range(2):
        rid = ledger.start_reconcile("demo", FLOW, "r", repair=False)
        ledger.add_drift(rid, "demo", FLOW, "call2__v", [{"external_id": "X1", "kind": "stale", "source_id": "loaded"}])
        ledger.finish_reconcile(rid, "success", {})
        reconciles.append(rid)
    with ledger.engine.begin() as db:
        db.execute(update(reconcile_runs).values(started_at=datetime.now(timezone.utc) - timedelta(days=200)))

    reports = Path(os.environ["CLINICAL_CRM_REPORTS_DIR"]) / "demo"
    suffixes = (".json", ".quarantine.csv", ".quarantine.json")
    run_files, inactive = reports / "runs" / FLOW, reports / "runs" / "crm_to_ctms"
    for folder, name, age in ((run_files, "old", 60), (run_files, "recent", 1),
                              (inactive, "older", 50), (inactive, "last", 40)):  # a flow idle for 40 days
        folder.mkdir(parents=True, exist_ok=True)
        for suffix in suffixes:
            (folder / f"{name}{suffix}").write_text("x")
            _aged(folder / f"{name}{suffix}", age)
    staging = tmp_path / "staging" / "demo" / FLOW
    for name, hours in (("crashed", 72), ("retrying", 2)):
        (staging / name).mkdir(parents=True)
        (staging / name / "activities.parquet").write_bytes(b"x" * 100)
        _aged(staging / name, hours / 24)
    gx = reports / "gx"
    for i, age in enumerate((90, 80, 3, 2, 1, 0)):
        _gx_run(gx, f"run{i}", age)

    cfg = demo_cfg.model_copy(update={"retention": demo_cfg.retention.model_copy(update={"data_docs_runs": 3})})
    removed = housekeeping.housekeep(cfg, ledger)

    # outcomes of the old run: only those no open quarantine row or queued mark needs are gone
    with ledger.engine.connect() as db:
        kept = sorted(db.execute(select(record_outcomes.c.source_id, record_outcomes.c.run_id)).all())
    assert kept == [("held", old), ("long held", recent), ("marked", old), ("new", recent)]
    assert scope.accepted_quarantine_ids() == {"held", "long held"}  # the next run still knows them as known open items
    assert sorted(scope.quarantined_ids()) == ["held", "long held"]
    assert [d["source_id"] for d in scope.pending_deletions()] == ["marked"]
    assert _count(ledger, id_map) == 1 and _count(ledger, source_versions) == 1
    assert _count(ledger, quarantine) == 3 and _count(ledger, deletion_queue) == 1 and _count(ledger, runs) == 2
    assert _count(ledger, dq_summaries) == 0
    assert ledger.last_success_end("demo", FLOW) == last_end
    with ledger.engine.connect() as db:
        assert set(db.execute(select(drift.c.run_id)).scalars()) == {reconciles[-1]}
    # run files: older than 30 days go, the newest run's stay whatever their age
    assert sorted(p.name for p in run_files.iterdir()) == sorted(f"recent{s}" for s in suffixes)
    assert sorted(p.name for p in inactive.iterdir()) == sorted(f"last{s}" for s in suffixes)
    # staging: the crashed run's folder (72 h untouched) goes, the one written 2 h ago stays
    assert [p.name for p in staging.iterdir()] == ["retrying"]
    # GX: the live project keeps the newest 3 runs; the archived ones older than 30 days are gone
    live = gx / quality.RESULTS / "demo" / OBJECT / "completeness"
    assert sorted(p.name for p in live.iterdir()) == ["run3", "run4", "run5"]
    assert sorted(p.name for p in (gx / quality.PAGES / "demo" / OBJECT / "completeness").iterdir()) == \
        ["run3", "run4", "run5"]
    archived = quality.archive_dir(gx) / "results" / "demo" / OBJECT / "completeness"
    assert sorted(p.name for p in archived.iterdir()) == ["run2"]
    assert removed["record outcomes"] == 3 and removed["run files"] == 6 and removed["staged runs"] == 1
    assert removed["archived GX results folders"] == 2 and removed["drift rows"] == 1

    assert housekeeping.housekeep(cfg, ledger) == {"bytes": 0}  # a second pass finds nothing more


def test_a_run_keeps_its_own_gx_results_whatever_their_time(places):
    root = Path(os.environ["CLINICAL_CRM_REPORTS_DIR"]) / "demo" / "gx"
    for i in range(4):
        _gx_run(root, f"run{i}", 10 - i)
    _gx_run(root, "current", 30)  # a backfill's run: an old run time, still this run's
    assert quality.archive_old_runs(root, keep=2, protect="current") == 2
    live = root / quality.RESULTS / "demo" / OBJECT / "completeness"
    assert sorted(p.name for p in live.iterdir()) == ["current", "run2", "run3"]


# ---------------------------------------------------------------- indexes (PostgreSQL EXPLAIN)

HISTORY_SQL = [
    # a year of hourly runs of two flows, and of another connection
    """INSERT INTO runs (connection, direction, dag_run_id, window_start, window_end, state, counts, started_at, ended_at)
       SELECT CASE WHEN i % 5 = 0 THEN 'other' ELSE 'demo' END, CASE WHEN i % 2 = 0 THEN 'ctms_to_crm' ELSE 'crm_to_ctms' END,
              'scheduled__' || i, now() - (i || ' hours')::interval - interval '1 hour', now() - (i || ' hours')::interval,
              CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'success' END, '{}', now() - (i || ' hours')::interval,
              now() - (i || ' hours')::interval FROM generate_series(1, 20000) AS i""",
    """INSERT INTO quarantine (connection, direction, object, source_id, reasons, first_seen, last_seen, last_run_id, resolved_at)
       SELECT 'demo', 'ctms_to_crm', 'activity__v', 'Q' || i, '[]', now(), now(), 1,
              CASE WHEN i % 100 = 0 THEN NULL ELSE now() END FROM generate_series(1, 100000) AS i""",
    """INSERT INTO deletion_queue (connection, direction, object, source_id, global_id, state, attempts, first_seen, updated_at)
       SELECT 'demo', 'ctms_to_crm', 'activity__v', 'D' || i, 'G' || i, CASE WHEN i % 1000 = 0 THEN 'pending' ELSE 'applied' END,
              1, now(), now() FROM generate_series(1, 100000) AS i""",
    """INSERT INTO record_outcomes (connection, direction, object, source_id, run_id, outcome, at)
       SELECT 'demo', 'ctms_to_crm', 'activity__v', CASE WHEN i % 20 = 0 THEN 'Q' || (i % 100000) ELSE 'R' || (i % 50000) END,
              i % 20000, CASE WHEN i % 20 = 0 THEN 'quarantined' ELSE 'updated' END, now()
       FROM generate_series(1, 200000) AS i""",
    """INSERT INTO reconcile_runs (connection, flow, dag_run_id, repair, state, summary, started_at)
       SELECT 'demo', 'ctms_to_crm', 'r' || i, 0, 'success', '{}', now() FROM generate_series(1, 5000) AS i""",
    """INSERT INTO drift (connection, flow, run_id, object, source_id, external_id, kind, detected_at)
       SELECT 'demo', 'ctms_to_crm', i % 5000, 'call2__v', 'S' || i, 'X' || i, 'stale', now()
       FROM generate_series(1, 100000) AS i""",
    "ANALYZE",
]

BIG = ("runs", "quarantine", "deletion_queue", "record_outcomes", "drift", "reconcile_runs")


def test_the_hot_ledger_queries_read_indexes_on_postgresql():
    with PostgresDatabase("ledger_ci") as database:
        ledger = Ledger(database.url)
        with ledger.engine.begin() as db:
            for sql in HISTORY_SQL:
                db.execute(text(sql))
        statements: list[tuple[str, object]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            if statement.lstrip().upper().startswith("SELECT") and "pg_" not in statement:
                statements.append((statement, parameters))

        event.listen(ledger.engine, "before_cursor_execute", capture)
        # what a run asks (begin, validate, load's deletion marks) and what the page asks
        ledger.last_success_end("demo", "ctms_to_crm")
        ledger.start_run("demo", "ctms_to_crm", "scheduled__5", None, None)
        ledger.quarantined_ids("demo", "ctms_to_crm", "activity__v")
        ledger.pending_deletions("demo", "ctms_to_crm", "activity__v")
        ledger.connections()
        ledger.recent_runs("demo", limit=20)
        ledger.last_success_ends("demo")
        ledger.quarantine_page("demo", limit=20)
        ledger.count_quarantine("demo")
        ledger.drift("demo", limit=20)
        ledger.reconcile_runs("demo", limit=1)
        ledger.quarantine_objects("demo")
        ledger.accepted_quarantine_ids("demo", "ctms_to_crm", "activity__v")
        event.remove(ledger.engine, "before_cursor_execute", capture)
        assert len(statements) >= 12
        scans = []
        with ledger.engine.connect() as db:
            raw = db.connection.dbapi_connection
            assert raw is not None
            with raw.cursor() as cursor:
                for statement, parameters in statements:
                    cursor.execute("EXPLAIN " + statement, parameters)
                    plan = "\n".join(row[0] for row in cursor.fetchall())
                    scanned = [t for t in re.findall(r"Seq Scan on (\w+)", plan) if t in BIG]
                    if scanned:
                        scans.append((statement, plan))
        ledger.engine.dispose()
        assert not scans, "\n\n".join(f"{s}\n{p}" for s, p in scans)
