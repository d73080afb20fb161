"""The sync ledger: what each run did, record by record (SQLAlchemy 2; SQLite by default).

Tables: `runs` (one row per DAG run and direction, with its window, state and counts),
`record_outcomes` (one row per record per run), `quarantine` (records held back, with their
reasons, until they go through), `id_map` (source id -> target id / external id),
`dq_summaries`, `source_versions` (the newest source version, `modified_date__v`, written to
the target per record: an older extraction loaded later is not written over it) and
`deletion_queue` (every deleted source record whose target record must be marked: pending
until the mark is written, then applied, so each is marked once and none is forgotten) and
`quarantine_actions` (what a data engineer decided about a quarantined record on the page:
"retry" keeps or reopens it, so the next run reads it again; "ignore" closes it for good; each
with the Airflow user and the reason).
The schema is kept by Alembic migrations (engine/migrations), applied when a ledger is opened. The read API at the bottom (`recent_runs`, `open_quarantine`,
`quarantine_page`, `record_history`, `connections`, ...) returns plain dicts; the Airflow UI
plugin relies on it. Quarantine triage pages in SQL (LIMIT/OFFSET; the CSV export walks the
filtered set by id, a chunk at a time), so 100,000 open rows cost one page of rows per request.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    bindparam,
    JSON,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    cast,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from clinical_crm import settings
from clinical_crm.times import as_utc, now as _now

metadata = MetaData()


def _record_key(index_connection: bool = False, index_source: bool = False) -> list[Column]:
    """The columns that name one source record of one connection and direction."""
    return [Column("id", Integer, primary_key=True, autoincrement=True),
            Column("connection", String(100), nullable=False, index=index_connection),
            Column("direction", String(20), nullable=False),
            Column("object", String(100), nullable=False),  # the source object
            Column("source_id", String(255), nullable=False, index=index_source)]

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(100), nullable=False, index=True),
    Column("direction", String(20), nullable=False),
    Column("dag_run_id", String(250), nullable=False),
    Column("window_start", DateTime(timezone=True)),
    Column("window_end", DateTime(timezone=True)),
    Column("state", String(20), nullable=False),  # running | success | partial | failed | inactive
    Column("counts", JSON),
    Column("dq_report", Text),
    Column("message", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("ended_at", DateTime(timezone=True)),
    # the start of every Vault call's X-VaultAPI-ReferenceID in this run (migration 0005)
    Column("reference_prefix", String(100)),
)

record_outcomes = Table(
    "record_outcomes",
    metadata,
    *_record_key(index_source=True),
    Column("run_id", Integer, nullable=False, index=True),
    Column("target_id", String(255)),
    Column("outcome", String(30), nullable=False),
    Column("error_type", String(100)),
    Column("message", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

quarantine = Table(
    "quarantine",
    metadata,
    *_record_key(index_connection=True, index_source=True),
    Column("reasons", JSON, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
    Column("last_run_id", Integer),
    Column("resolved_at", DateTime(timezone=True)),
)

# No index on connection alone: without statistics SQLite preferred it to the source_id or
# external_id index for "connection = ? AND source_id IN (500 ids)" and read every row of the
# connection for each batch (190 ms a batch at 1,000,000 rows, growing with the table).
id_map = Table(
    "id_map",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(100), nullable=False),
    Column("object", String(100), nullable=False),
    Column("source_id", String(255), nullable=False, index=True),
    Column("target_id", String(255)),
    Column("external_id", String(255), index=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

dq_summaries = Table(
    "dq_summaries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, nullable=False, index=True),
    Column("connection", String(100), nullable=False),
    Column("direction", String(20), nullable=False),
    Column("object", String(100), nullable=False),
    Column("rows", Integer, nullable=False),
    Column("failing_rows", Integer, nullable=False),
    Column("failing_share", Float, nullable=False),
    Column("reasons", JSON),  # {reason: count}
    Column("success", Integer, nullable=False),
    Column("report_path", Text),
    Column("at", DateTime(timezone=True), nullable=False),
)

# The newest version (the source record's modified_date__v, UTC) of each source record that a
# load has written to the target.
source_versions = Table(
    "source_versions",
    metadata,
    *_record_key(),
    Column("modified_date", DateTime(timezone=True), nullable=False),
    Column("run_id", Integer),  # the run that wrote it
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("connection", "direction", "object", "source_id", name="uq_source_versions_record"),
)

# Deleted source records whose target record gets a deletion mark ("Deleted" appended, status
# "Deleted in Vault Clinical", inactivated). `state`: pending (re-driven by every run until it
# goes through), applied, or no_target (the target record never existed). `expected`: the values
# a run is about to write, so a mark written by a run that died before recording it is known.
deletion_queue = Table(
    "deletion_queue",
    metadata,
    *_record_key(),
    Column("global_id", String(255)),
    Column("state", String(20), nullable=False),
    Column("expected", JSON),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error_type", String(100)),
    Column("message", Text),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("run_id", Integer),  # the run that last tried it
    UniqueConstraint("connection", "direction", "object", "source_id", name="uq_deletion_queue_record"),
)

# A data engineer's decision about one quarantine row (revision 0003).
QUARANTINE_ACTIONS = ("retry", "ignore")
quarantine_actions = Table(
    "quarantine_actions",
    metadata,
    *_record_key(index_source=True),
    Column("quarantine_id", Integer, nullable=False, index=True),
    Column("action", String(20), nullable=False),  # retry | ignore
    Column("reason", Text),
    Column("actor", String(250), nullable=False),  # the Airflow user
    Column("at", DateTime(timezone=True), nullable=False),
)

# Reconciliation (engine/reconcile.py): one row per flow per reconcile DAG run, with its summary
# ({target object: {expected, in_target, <drift kind>: n, repaired}}), and one `drift` row per
# record found different from what the source says the target should hold.
def _reconcile_key() -> list[Column]:
    """The columns both reconciliation tables start with: row id, connection, flow."""
    return [Column("id", Integer, primary_key=True, autoincrement=True),
            Column("connection", String(100), nullable=False, index=True),
            Column("flow", String(20), nullable=False)]


reconcile_runs = Table(
    "reconcile_runs",
    metadata,
    *_reconcile_key(),
    Column("dag_run_id", String(250), nullable=False),
    Column("repair", Integer, nullable=False),
    Column("state", String(20), nullable=False),  # running | success | failed
    Column("summary", JSON),
    Column("message", Text),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
)

drift = Table(
    "drift",
    metadata,
    *_reconcile_key(),
    Column("run_id", Integer, nullable=False, index=True),  # reconcile_runs.id
    Column("object", String(100), nullable=False),  # the target object
    Column("source_id", String(255)),
    Column("external_id", String(255), nullable=False),
    Column("kind", String(30), nullable=False),  # missing | stale | extra | missing_deletion_mark
    Column("details", JSON),  # stale: {field: {expected, actual}}; marks: the values expected
    Column("detected_at", DateTime(timezone=True), nullable=False),
    Column("repaired_at", DateTime(timezone=True)),
)

log = logging.getLogger(__name__)

_ENGINES: dict[str, Engine] = {}
# Run states whose window counts as done: success, and partial (deletion marks left queued)
COMPLETED_STATES = ("success", "partial")



_utc = as_utc  # SQLite hands datetimes back naive; they were stored as UTC


def _log_wait(name: str, started: float) -> None:
    waited = time.monotonic() - started
    if waited > 1:
        log.info("waited %.1f s for %s (another run held it)", waited, name)


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value else None


def _stored_versions(db, connection: str, direction: str, object_name: str,
                     source_ids: Iterable[str]) -> dict[str, datetime]:
    """{source id: stored version} for those of `source_ids` a load has written (IN chunks of 500)."""
    ids = sorted({str(s) for s in source_ids})
    found: dict[str, datetime] = {}
    for start in range(0, len(ids), 500):
        found.update((source, _utc(moment)) for source, moment in db.execute(
            select(source_versions.c.source_id, source_versions.c.modified_date).where(
                source_versions.c.connection == connection, source_versions.c.direction == direction,
                source_versions.c.object == object_name,
                source_versions.c.source_id.in_(ids[start:start + 500]))))
    return found


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    """The embedded SQLite ledger: write-ahead log, so the UI page and a second run read while a
    load writes; waits up to 60 s for another process's write lock; copies the log back into the
    file every 30,000 pages (~120 MB) rather than every 1,000, which a load's per-batch outcome,
    id-map and version writes reached on nearly every commit, and keeps at most 64 MB of log file
    after that. Commits are not synced one by one, only at those copies: a crash loses none, a
    power cut the commits since the last copy, which re-running those windows writes again."""
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.execute("PRAGMA wal_autocheckpoint=30000")
    cursor.execute("PRAGMA journal_size_limit=67108864")
    cursor.close()


def _engine(url: str) -> Engine:
    """One engine per URL per process; the schema is brought up to date on first use."""
    if url not in _ENGINES:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(engine, "connect", _sqlite_pragmas)
        from clinical_crm.engine.migrations import upgrade

        upgrade(engine)
        _ENGINES[url] = engine
    return _ENGINES[url]


class Ledger:
    def __init__(self, url: str | None = None):
        self.url = url or settings.ledger_url()
        self.engine = _engine(self.url)

    # ------------------------------------------------------------ writing: runs

    def start_run(self, connection: str, direction: str, dag_run_id: str,
                  window_start: datetime | None, window_end: datetime | None, state: str = "running",
                  reference_prefix: str | None = None) -> int:
        """A run row; a retried first task of the same DAG run reuses its row."""
        with self.engine.begin() as db:
            existing = db.execute(
                select(runs.c.id).where(runs.c.connection == connection, runs.c.direction == direction,
                                        runs.c.dag_run_id == dag_run_id)
            ).scalar()
            values = dict(window_start=window_start, window_end=window_end, state=state,
                          started_at=_now(), ended_at=None, message=None, reference_prefix=reference_prefix)
            if existing:
                db.execute(update(runs).where(runs.c.id == existing).values(**values))
                return existing
            return db.execute(
                insert(runs).values(connection=connection, direction=direction, dag_run_id=dag_run_id,
                                    counts={}, **values)
            ).inserted_primary_key[0]

    def finish_run(self, run_id: int, state: str, counts: dict | None = None,
                   dq_report: str | None = None, message: str | None = None) -> None:
        values: dict[str, Any] = dict(state=state, ended_at=_now())
        if counts is not None:
            values["counts"] = counts
        if dq_report is not None:
            values["dq_report"] = dq_report
        if message is not None:
            values["message"] = message
        with self.engine.begin() as db:
            db.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def set_counts(self, run_id: int, counts: dict, dq_report: str | None = None) -> None:
        values: dict[str, Any] = {"counts": counts}
        if dq_report is not None:
            values["dq_report"] = dq_report
        with self.engine.begin() as db:
            db.execute(update(runs).where(runs.c.id == run_id).values(**values))

    def run(self, run_id: int) -> dict:
        with self.engine.connect() as db:
            row = db.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        return _run_dict(row)

    def last_success_end(self, connection: str, direction: str) -> datetime | None:
        """End of the last successful window of this connection and direction (a partial run
        moved its window: what it left behind is queued, not bound to the window)."""
        with self.engine.connect() as db:
            value = db.execute(
                select(func.max(runs.c.window_end)).where(
                    runs.c.connection == connection, runs.c.direction == direction,
                    runs.c.state.in_(COMPLETED_STATES))
            ).scalar()
        return _utc(value)

    # ------------------------------------------------------------ writing: records

    def add_outcomes(self, run_id: int, connection: str, direction: str, object_name: str,
                     outcomes: Iterable[dict]) -> None:
        """Outcome rows: dicts with source_id, outcome and optionally target_id, error_type, message."""
        now = _now()
        rows = [
            dict(run_id=run_id, connection=connection, direction=direction, object=object_name,
                 source_id=str(o["source_id"]), target_id=o.get("target_id"), outcome=o["outcome"],
                 error_type=o.get("error_type"), message=o.get("message"), at=now)
            for o in outcomes
        ]
        if rows:
            with self.engine.begin() as db:
                db.execute(insert(record_outcomes), rows)

    def clear_outcomes(self, run_id: int, object_name: str | None = None, only: list[str] | None = None,
                       exclude: list[str] | None = None) -> None:
        """Forget outcomes a retried task is about to write again (one outcome per record per run)."""
        query = record_outcomes.delete().where(record_outcomes.c.run_id == run_id)
        if object_name:
            query = query.where(record_outcomes.c.object == object_name)
        if only:
            query = query.where(record_outcomes.c.outcome.in_(only))
        if exclude:
            query = query.where(record_outcomes.c.outcome.not_in(exclude))
        with self.engine.begin() as db:
            db.execute(query)

    def written_outcomes(self, run_id: int, objects: Iterable[str]) -> dict[str, dict[str, str]]:
        """{object: {source id: outcome}} of the records this run has written so far (created,
        updated, marked_deleted) or sent without an answer (unknown): a retried load keeps them
        as the outcome that counted."""
        found: dict[str, dict[str, str]] = {}
        with self.engine.connect() as db:
            for obj, source, outcome in db.execute(
                    select(record_outcomes.c.object, record_outcomes.c.source_id, record_outcomes.c.outcome).where(
                        record_outcomes.c.run_id == run_id, record_outcomes.c.object.in_(list(objects)),
                        record_outcomes.c.outcome.in_(("created", "updated", "marked_deleted", "unknown")))):
                found.setdefault(obj, {})[source] = outcome
        return found

    def outcome_count(self, run_id: int, object_name: str, outcome: str) -> int:
        with self.engine.connect() as db:
            return db.execute(select(func.count()).select_from(record_outcomes).where(
                record_outcomes.c.run_id == run_id, record_outcomes.c.object == object_name,
                record_outcomes.c.outcome == outcome)).scalar() or 0

    @contextlib.contextmanager
    def exclusive(self, name: str):
        """Hold a named lock across processes while the block runs (two loads of one connection
        and target object never overlap): a PostgreSQL advisory lock, or a file lock beside a
        SQLite ledger (one machine). Waiting for another holder is logged."""
        started = time.monotonic()
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
            with self.engine.connect() as db:
                db.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                _log_wait(name, started)
                try:
                    yield
                finally:
                    db.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    db.commit()
        elif self.engine.url.database and self.engine.dialect.name == "sqlite":
            folder = Path(f"{self.engine.url.database}.locks")
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock", "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                _log_wait(name, started)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        else:  # an in-memory ledger: one process
            yield

    def quarantine_records(self, run_id: int, connection: str, direction: str, object_name: str,
                           reasons_by_id: dict[str, list[str]]) -> None:
        """Hold records back with their reasons (one open row per record, refreshed each run)."""
        if not reasons_by_id:
            return
        now = _now()
        ids = list(reasons_by_id)
        with self.engine.begin() as db:
            # the open rows of these records only (500 ids a query), not every open row of the
            # object: memory and time per call follow the batch, not the whole quarantine. The
            # other key columns are compared here, not in SQL: with `connection = ?` in the query
            # SQLite chose the connection index and read every row of the connection per batch
            open_rows: dict[str, int] = {}
            for start in range(0, len(ids), 500):
                for row in db.execute(
                        select(quarantine.c.source_id, quarantine.c.id, quarantine.c.connection,
                               quarantine.c.direction, quarantine.c.object).where(
                            quarantine.c.source_id.in_(ids[start:start + 500]), quarantine.c.resolved_at.is_(None))):
                    if (row.connection, row.direction, row.object) == (connection, direction, object_name):
                        open_rows[row.source_id] = row.id
            for source_id, reasons in reasons_by_id.items():
                if source_id in open_rows:
                    db.execute(update(quarantine).where(quarantine.c.id == open_rows[source_id]).values(
                        reasons=list(reasons), last_seen=now, last_run_id=run_id))
                else:
                    db.execute(insert(quarantine).values(
                        connection=connection, direction=direction, object=object_name,
                        source_id=source_id, reasons=list(reasons), first_seen=now, last_seen=now,
                        last_run_id=run_id))

    def resolve_quarantine(self, connection: str, direction: str, object_name: str,
                           source_ids: Iterable[str]) -> int:
        """Close the open quarantine rows of records that went through."""
        ids = [str(s) for s in source_ids]
        done = 0
        with self.engine.begin() as db:
            for start in range(0, len(ids), 500):
                done += db.execute(update(quarantine).where(
                    quarantine.c.connection == connection, quarantine.c.direction == direction,
                    quarantine.c.object == object_name, quarantine.c.resolved_at.is_(None),
                    quarantine.c.source_id.in_(ids[start:start + 500])).values(resolved_at=_now())).rowcount
        return done

    def act_on_quarantine(self, quarantine_id: int, action: str, actor: str, reason: str | None = None) -> dict:
        """A data engineer's decision about a quarantined record, recorded with who took it.

        "ignore" closes the record's open row for good (the runner re-reads open rows only);
        "retry" keeps it open, or reopens its row when it was closed, so the next run reads the
        record again. Returns the row as it is afterwards; KeyError for an unknown row.
        """
        if action not in QUARANTINE_ACTIONS:
            raise ValueError(f"unknown quarantine action {action!r}")
        now = _now()
        with self.engine.begin() as db:
            row = db.execute(select(quarantine).where(quarantine.c.id == quarantine_id)).mappings().first()
            if row is None:
                raise KeyError(quarantine_id)
            if row["resolved_at"] is None or action == "retry":
                # one open row per record: a retry of an old row reopens nothing if a newer one is open
                newer_open = db.execute(select(quarantine.c.id).where(
                    quarantine.c.connection == row["connection"], quarantine.c.direction == row["direction"],
                    quarantine.c.object == row["object"], quarantine.c.source_id == row["source_id"],
                    quarantine.c.resolved_at.is_(None), quarantine.c.id != row["id"])).scalar()
                resolved_at = now if action == "ignore" else None
                if newer_open is None:
                    db.execute(update(quarantine).where(quarantine.c.id == row["id"]).values(resolved_at=resolved_at))
            db.execute(insert(quarantine_actions).values(
                quarantine_id=row["id"], connection=row["connection"], direction=row["direction"],
                object=row["object"], source_id=row["source_id"], action=action, reason=reason, actor=actor, at=now))
        return self.quarantine_entry(quarantine_id)

    def quarantined_ids(self, connection: str, direction: str, object_name: str) -> list[str]:
        """Source ids still quarantined: extraction re-reads them by id every run."""
        with self.engine.connect() as db:
            return list(db.execute(select(quarantine.c.source_id).where(
                quarantine.c.connection == connection, quarantine.c.direction == direction,
                quarantine.c.object == object_name, quarantine.c.resolved_at.is_(None))).scalars())

    def accepted_quarantine_ids(self, connection: str, direction: str, object_name: str) -> set[str]:
        """Open quarantine records that a successful run has already quarantined: known open items.

        Records first held back by a run that then failed (e.g. on the quality threshold) are not
        in it, so the next run counts them again instead of waving them through.
        """
        with self.engine.connect() as db:
            return set(db.execute(
                select(quarantine.c.source_id).distinct()
                .join(record_outcomes, (record_outcomes.c.source_id == quarantine.c.source_id)
                      & (record_outcomes.c.object == quarantine.c.object)
                      & (record_outcomes.c.connection == quarantine.c.connection)
                      & (record_outcomes.c.outcome == "quarantined"))
                .join(runs, (runs.c.id == record_outcomes.c.run_id) & runs.c.state.in_(COMPLETED_STATES)
                      & (runs.c.direction == direction))
                .where(quarantine.c.connection == connection, quarantine.c.direction == direction,
                       quarantine.c.object == object_name, quarantine.c.resolved_at.is_(None))
            ).scalars())

    def map_ids(self, connection: str, object_name: str, rows: Iterable[dict]) -> None:
        """Remember source id -> target id / external id (rows: source_id, target_id, external_id)."""
        rows = list(rows)
        if not rows:
            return
        now = _now()
        with self.engine.begin() as db:
            known = {}
            ids = [str(r["source_id"]) for r in rows]
            for start in range(0, len(ids), 500):
                known.update(db.execute(select(id_map.c.source_id, id_map.c.id).where(
                    id_map.c.connection == connection, id_map.c.object == object_name,
                    id_map.c.source_id.in_(ids[start:start + 500]))).all())
            # one executemany per kind instead of a statement per row (10,000 rows: 4.2 s -> ~0.2 s)
            updates, inserts = [], []
            for r in rows:
                source = str(r["source_id"])
                values = dict(target_id=r.get("target_id"), external_id=r.get("external_id"), updated_at=now)
                if source in known:
                    updates.append({"row_id": known[source], "new_target": values["target_id"],
                                    "new_external": values["external_id"], "new_at": now})
                else:
                    inserts.append(dict(values, connection=connection, object=object_name, source_id=source))
            if updates:
                db.execute(update(id_map).where(id_map.c.id == bindparam("row_id"))
                           .values(target_id=bindparam("new_target"), external_id=bindparam("new_external"),
                                   updated_at=bindparam("new_at")), updates)
            if inserts:
                db.execute(insert(id_map), inserts)

    def known_external_ids(self, connection: str, object_name: str, external_ids: Iterable[str]) -> set[str]:
        """Which of these external ids were loaded before (a target record exists for them)."""
        ids = list({str(e) for e in external_ids})
        found: set[str] = set()
        with self.engine.connect() as db:
            for start in range(0, len(ids), 500):
                found.update(db.execute(select(id_map.c.external_id).where(
                    id_map.c.connection == connection, id_map.c.object == object_name,
                    id_map.c.target_id.is_not(None),
                    id_map.c.external_id.in_(ids[start:start + 500]))).scalars())
        return found

    def loaded_versions(self, connection: str, direction: str, object_name: str,
                        source_ids: Iterable[str]) -> dict[str, datetime]:
        """The newest source version already written to the target, by source id (those known)."""
        with self.engine.connect() as db:
            return _stored_versions(db, connection, direction, object_name, source_ids)

    def record_versions(self, connection: str, direction: str, object_name: str,
                        versions: dict[str, datetime], run_id: int | None = None) -> None:
        """Remember the source versions just written to the target, keeping the newest per record.

        Safe against concurrent loads: an update only ever raises the stored version (the
        comparison is in the UPDATE itself), and an insert that loses a race to another load's
        insert is retried as an update.
        """
        versions = {str(k): as_utc(v) for k, v in versions.items() if v is not None}
        if not versions:
            return
        for attempt in range(5):
            try:
                self._record_versions(connection, direction, object_name, versions, run_id)
                return
            except IntegrityError:  # another load inserted one of these records first
                if attempt == 4:
                    raise

    def _record_versions(self, connection: str, direction: str, object_name: str,
                         versions: dict[str, datetime], run_id: int | None) -> None:
        now = _now()
        ids = sorted(versions)
        with self.engine.begin() as db:
            known = _stored_versions(db, connection, direction, object_name, ids)
            updates = [{"key": s, "new_date": versions[s], "new_run": run_id, "new_at": now} for s in ids if s in known]
            inserts = [dict(connection=connection, direction=direction, object=object_name, source_id=s,
                            modified_date=versions[s], run_id=run_id, updated_at=now) for s in ids if s not in known]
            if updates:
                db.execute(update(source_versions).where(
                    source_versions.c.connection == connection, source_versions.c.direction == direction,
                    source_versions.c.object == object_name, source_versions.c.source_id == bindparam("key"),
                    source_versions.c.modified_date < bindparam("new_date"))
                    .values(modified_date=bindparam("new_date"), run_id=bindparam("new_run"),
                            updated_at=bindparam("new_at")), updates)
            if inserts:
                db.execute(insert(source_versions), inserts)

    # ------------------------------------------------------------ writing: the deletion queue

    def queue_deletions(self, connection: str, direction: str, object_name: str,
                        deleted: Iterable[tuple[str, str]], run_id: int | None = None) -> int:
        """Queue deleted source records (source id, global id) for their deletion mark; a record
        queued before keeps its row and state (so a mark is never applied twice). Returns how
        many were new."""
        rows = {str(s): str(g) for s, g in deleted}
        if not rows:
            return 0
        now = _now()
        with self.engine.begin() as db:
            known = set()
            ids = sorted(rows)
            for start in range(0, len(ids), 500):
                known.update(db.execute(select(deletion_queue.c.source_id).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name,
                    deletion_queue.c.source_id.in_(ids[start:start + 500]))).scalars())
            new = [dict(connection=connection, direction=direction, object=object_name, source_id=s,
                        global_id=rows[s], state="pending", attempts=0, first_seen=now, updated_at=now,
                        run_id=run_id) for s in ids if s not in known]
            if new:
                db.execute(insert(deletion_queue), new)
        return len(new)

    def pending_deletions(self, connection: str, direction: str, object_name: str) -> list[dict]:
        """Queued deletions not yet marked: this run's and every earlier run's that did not go through."""
        with self.engine.connect() as db:
            return [dict(r) for r in db.execute(
                select(deletion_queue.c.source_id, deletion_queue.c.global_id, deletion_queue.c.expected,
                       deletion_queue.c.attempts).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name, deletion_queue.c.state == "pending")
                .order_by(deletion_queue.c.id)).mappings()]

    def expect_deletions(self, connection: str, direction: str, object_name: str,
                         expected: dict[str, dict]) -> None:
        """Remember the values about to be written as deletion marks (before the write call)."""
        if expected:
            with self.engine.begin() as db:
                db.execute(update(deletion_queue).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name, deletion_queue.c.source_id == bindparam("key"))
                    .values(expected=bindparam("expected"), updated_at=_now()),
                    [{"key": s, "expected": v} for s, v in expected.items()])

    def settle_deletions(self, connection: str, direction: str, object_name: str, outcomes: Iterable[dict],
                         no_target: Iterable[str] = (), run_id: int | None = None) -> None:
        """Record what this run's attempt did: applied (marked now or found marked), still pending
        after a failure (counted in `attempts`, with the vault's error), or no target record."""
        now = _now()
        rows = []
        for o in outcomes:
            applied = o["outcome"] in ("marked_deleted", "unchanged")
            rows.append({"key": str(o["source_id"]), "state": "applied" if applied else "pending",
                         "error_type": None if applied else o.get("error_type"),
                         "message": None if applied else o.get("message"), "failed": 0 if applied else 1})
        rows += [{"key": str(s), "state": "no_target", "error_type": None, "message": None, "failed": 0}
                 for s in no_target]
        if rows:
            with self.engine.begin() as db:
                db.execute(update(deletion_queue).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name, deletion_queue.c.source_id == bindparam("key"))
                    .values(state=bindparam("state"), error_type=bindparam("error_type"),
                            message=bindparam("message"), attempts=deletion_queue.c.attempts + bindparam("failed"),
                            updated_at=now, run_id=run_id), rows)

    def add_dq_summary(self, run_id: int, connection: str, direction: str, object_name: str,
                       rows: int, failing_rows: int, reasons: dict[str, int], success: bool,
                       report_path: str | None) -> None:
        with self.engine.begin() as db:
            db.execute(insert(dq_summaries).values(
                run_id=run_id, connection=connection, direction=direction, object=object_name, rows=rows,
                failing_rows=failing_rows, failing_share=(failing_rows / rows) if rows else 0.0,
                reasons=reasons, success=int(success), report_path=report_path, at=_now()))

    # ------------------------------------------------------------ read API (UI plugin, engineers)

    def recent_runs(self, connection: str | None = None, limit: int = 20) -> list[dict]:
        """The latest runs, newest first (all connections when `connection` is None)."""
        query = select(runs).order_by(runs.c.id.desc()).limit(limit)
        if connection:
            query = query.where(runs.c.connection == connection)
        with self.engine.connect() as db:
            return [_run_dict(r) for r in db.execute(query).mappings()]

    def open_quarantine(self, connection: str | None = None) -> list[dict]:
        """Records held back and not yet through, oldest first, with their reasons."""
        query = select(quarantine).where(quarantine.c.resolved_at.is_(None)).order_by(quarantine.c.first_seen)
        if connection:
            query = query.where(quarantine.c.connection == connection)
        with self.engine.connect() as db:
            return [_quarantine_dict(r) for r in db.execute(query).mappings()]

    def quarantine_entry(self, quarantine_id: int) -> dict | None:
        """One quarantine row by its id (None when unknown)."""
        with self.engine.connect() as db:
            row = db.execute(select(quarantine).where(quarantine.c.id == quarantine_id)).mappings().first()
        return _quarantine_dict(row) if row else None

    def quarantine_page(self, connection: str, object_name: str | None = None, rule: str | None = None,
                        min_age_days: int | None = None, limit: int = 50, offset: int = 0) -> list[dict]:
        """One page of the open quarantine of a connection, oldest first, filtered by object, by
        text in its reasons (a rule's reason) and by age (first seen at least N days ago); paged
        in SQL (LIMIT/OFFSET)."""
        query = (select(quarantine).where(*_quarantine_filter(connection, object_name, rule, min_age_days))
                 .order_by(quarantine.c.id).limit(limit).offset(offset))
        with self.engine.connect() as db:
            return [_quarantine_dict(r) for r in db.execute(query).mappings()]

    def count_quarantine(self, connection: str, object_name: str | None = None, rule: str | None = None,
                         min_age_days: int | None = None) -> int:
        """How many open quarantine rows match the filters of `quarantine_page`."""
        query = select(func.count()).select_from(quarantine).where(
            *_quarantine_filter(connection, object_name, rule, min_age_days))
        with self.engine.connect() as db:
            return int(db.execute(query).scalar() or 0)

    def iter_quarantine(self, connection: str, object_name: str | None = None, rule: str | None = None,
                        min_age_days: int | None = None, chunk: int = 1000) -> Iterator[dict]:
        """Every open quarantine row matching the filters, oldest first, read `chunk` rows at a
        time by id (for a streamed export: memory stays one chunk whatever the size)."""
        after = 0
        while True:
            query = (select(quarantine).where(*_quarantine_filter(connection, object_name, rule, min_age_days),
                                              quarantine.c.id > after)
                     .order_by(quarantine.c.id).limit(chunk))
            with self.engine.connect() as db:
                rows = [_quarantine_dict(r) for r in db.execute(query).mappings()]
            yield from rows
            if len(rows) < chunk:
                return
            after = rows[-1]["id"]

    def quarantine_objects(self, connection: str) -> list[str]:
        """The objects with open quarantine rows in a connection (the triage filter's choices)."""
        with self.engine.connect() as db:
            return sorted(db.execute(select(quarantine.c.object).distinct().where(
                quarantine.c.connection == connection, quarantine.c.resolved_at.is_(None))).scalars())

    def last_success_ends(self, connection: str) -> dict[str, str]:
        """{direction: end of its last successful window} of a connection (ISO, UTC)."""
        with self.engine.connect() as db:
            rows = db.execute(select(runs.c.direction, func.max(runs.c.window_end)).where(
                runs.c.connection == connection, runs.c.state.in_(COMPLETED_STATES)).group_by(runs.c.direction)).all()
        return {direction: _iso(end) for direction, end in rows}

    def record_history(self, connection: str, source_id: str) -> dict:
        """What happened to record X, and when: outcomes per run (with windows), quarantine, id map."""
        with self.engine.connect() as db:
            outcomes = db.execute(
                select(record_outcomes, runs.c.dag_run_id, runs.c.window_start, runs.c.window_end)
                .join(runs, runs.c.id == record_outcomes.c.run_id)
                .where(record_outcomes.c.connection == connection, record_outcomes.c.source_id == str(source_id))
                .order_by(record_outcomes.c.id)
            ).mappings().all()
            held = db.execute(select(quarantine).where(
                quarantine.c.connection == connection, quarantine.c.source_id == str(source_id))
                .order_by(quarantine.c.id)).mappings().all()
            mapped = db.execute(select(id_map).where(
                id_map.c.connection == connection, id_map.c.source_id == str(source_id))).mappings().all()
            versions = db.execute(select(source_versions).where(
                source_versions.c.connection == connection, source_versions.c.source_id == str(source_id))
                .order_by(source_versions.c.id)).mappings().all()
            actions = db.execute(select(quarantine_actions).where(
                quarantine_actions.c.connection == connection, quarantine_actions.c.source_id == str(source_id))
                .order_by(quarantine_actions.c.id)).mappings().all()
        return {
            "connection": connection,
            "source_id": str(source_id),
            "outcomes": [
                {"run_id": o["run_id"], "dag_run_id": o["dag_run_id"], "direction": o["direction"],
                 "object": o["object"], "outcome": o["outcome"], "target_id": o["target_id"],
                 "error_type": o["error_type"], "message": o["message"], "at": _iso(o["at"]),
                 "window_start": _iso(o["window_start"]), "window_end": _iso(o["window_end"])}
                for o in outcomes
            ],
            "quarantine": [_quarantine_dict(q) for q in held],
            "id_map": [{"object": m["object"], "target_id": m["target_id"], "external_id": m["external_id"],
                        "updated_at": _iso(m["updated_at"])} for m in mapped],
            "versions": [{"direction": v["direction"], "object": v["object"],
                          "modified_date": _iso(v["modified_date"]), "run_id": v["run_id"],
                          "updated_at": _iso(v["updated_at"])} for v in versions],
            "actions": [{"quarantine_id": a["quarantine_id"], "action": a["action"], "reason": a["reason"],
                         "actor": a["actor"], "at": _iso(a["at"])} for a in actions],
        }

    def connections(self) -> list[dict]:
        """Every connection seen in the ledger with its last run and open quarantine count."""
        with self.engine.connect() as db:
            names = sorted(db.execute(select(runs.c.connection).distinct()).scalars())
            result = []
            for name in names:
                last = db.execute(select(runs).where(runs.c.connection == name)
                                  .order_by(runs.c.id.desc()).limit(1)).mappings().first()
                held = db.execute(select(func.count()).select_from(quarantine).where(
                    quarantine.c.connection == name, quarantine.c.resolved_at.is_(None))).scalar()
                result.append({"connection": name, "last_run": _run_dict(last) if last else None,
                               "open_quarantine": int(held or 0)})
        return result

    def dq_summaries(self, run_id: int) -> list[dict]:
        with self.engine.connect() as db:
            rows = db.execute(select(dq_summaries).where(dq_summaries.c.run_id == run_id)).mappings().all()
        return [{**dict(r), "at": _iso(r["at"]), "success": bool(r["success"])} for r in rows]

    # ------------------------------------------------------------ reconciliation (engine/reconcile.py)

    def deletion_entries(self, connection: str, direction: str, object_name: str) -> dict[str, dict]:
        """Every queued deletion of a source object, by global id: source_id, state, expected."""
        with self.engine.connect() as db:
            return {str(r["global_id"]): dict(r) for r in db.execute(
                select(deletion_queue.c.global_id, deletion_queue.c.source_id, deletion_queue.c.state,
                       deletion_queue.c.expected).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name, deletion_queue.c.global_id.is_not(None))).mappings()}

    def start_reconcile(self, connection: str, flow: str, dag_run_id: str, repair: bool) -> int:
        with self.engine.begin() as db:
            return db.execute(insert(reconcile_runs).values(
                connection=connection, flow=flow, dag_run_id=dag_run_id, repair=int(repair), state="running",
                summary={}, started_at=_now())).inserted_primary_key[0]

    def finish_reconcile(self, run_id: int, state: str, summary: dict | None = None, message: str | None = None) -> None:
        values: dict[str, Any] = dict(state=state, ended_at=_now(), message=message)
        if summary is not None:
            values["summary"] = summary
        with self.engine.begin() as db:
            db.execute(update(reconcile_runs).where(reconcile_runs.c.id == run_id).values(**values))

    def add_drift(self, run_id: int, connection: str, flow: str, object_name: str, rows: Iterable[dict]) -> None:
        """Drift rows: dicts with external_id, kind, source_id and details."""
        now = _now()
        values = [dict(run_id=run_id, connection=connection, flow=flow, object=object_name,
                       source_id=r.get("source_id"), external_id=r["external_id"], kind=r["kind"],
                       details=r.get("details"), detected_at=now) for r in rows]
        if values:
            with self.engine.begin() as db:
                db.execute(insert(drift), values)

    def drift_repaired(self, run_id: int, object_name: str, external_ids: Iterable[str]) -> None:
        """Stamp repaired_at on this run's drift rows of these records."""
        ids = sorted({str(e) for e in external_ids})
        with self.engine.begin() as db:
            for start in range(0, len(ids), 500):
                db.execute(update(drift).where(drift.c.run_id == run_id, drift.c.object == object_name,
                                               drift.c.external_id.in_(ids[start:start + 500]))
                           .values(repaired_at=_now()))

    def drift(self, connection: str, limit: int = 200, run_id: int | None = None) -> list[dict]:
        """Drift found by reconciliation, newest first (one run's with `run_id`)."""
        query = select(drift).where(drift.c.connection == connection).order_by(drift.c.id.desc()).limit(limit)
        if run_id is not None:
            query = query.where(drift.c.run_id == run_id)
        with self.engine.connect() as db:
            return [{**dict(r), "detected_at": _iso(r["detected_at"]), "repaired_at": _iso(r["repaired_at"])}
                    for r in db.execute(query).mappings()]

    def reconcile_runs(self, connection: str | None = None, limit: int = 20) -> list[dict]:
        """Reconcile runs with their summaries, newest first."""
        query = select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(limit)
        if connection:
            query = query.where(reconcile_runs.c.connection == connection)
        with self.engine.connect() as db:
            return [{**dict(r), "run_id": r["id"], "repair": bool(r["repair"]), "summary": r["summary"] or {},
                     "started_at": _iso(r["started_at"]), "ended_at": _iso(r["ended_at"])}
                    for r in db.execute(query).mappings()]


def _run_dict(row) -> dict:
    counts = row["counts"]
    if isinstance(counts, str):
        counts = json.loads(counts)
    return {
        "run_id": row["id"], "connection": row["connection"], "direction": row["direction"],
        "dag_run_id": row["dag_run_id"], "window_start": _iso(row["window_start"]),
        "window_end": _iso(row["window_end"]), "state": row["state"], "counts": counts or {},
        "dq_report": row["dq_report"], "message": row["message"],
        "started_at": _iso(row["started_at"]), "ended_at": _iso(row["ended_at"]),
        "reference_prefix": row.get("reference_prefix"),
    }


def _quarantine_filter(connection: str, object_name: str | None, rule: str | None,
                       min_age_days: int | None) -> list:
    """WHERE clauses of the open quarantine of a connection, filtered for triage."""
    clauses = [quarantine.c.connection == connection, quarantine.c.resolved_at.is_(None)]
    if object_name:
        clauses.append(quarantine.c.object == object_name)
    if rule:
        text = json.dumps(rule)[1:-1]  # as the reasons are stored (JSON text)
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clauses.append(cast(quarantine.c.reasons, Text).like(f"%{pattern}%", escape="\\"))
    if min_age_days:
        clauses.append(quarantine.c.first_seen <= _now() - timedelta(days=min_age_days))
    return clauses


def _quarantine_dict(row) -> dict:
    return {
        "id": row["id"], "connection": row["connection"], "direction": row["direction"], "object": row["object"],
        "source_id": row["source_id"], "reasons": list(row["reasons"] or []),
        "first_seen": _iso(row["first_seen"]), "last_seen": _iso(row["last_seen"]),
        "resolved_at": _iso(row["resolved_at"]),
    }
