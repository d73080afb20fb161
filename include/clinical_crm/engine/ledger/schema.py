"""The ledger's tables and its database engine (SQLAlchemy 2; SQLite by default).

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
The schema is kept by Alembic migrations (engine/migrations), applied when a ledger is opened
(`_engine`): a table or column added here needs a migration too.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import (
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
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

from clinical_crm.times import as_utc

metadata = MetaData()

# The length of the columns holding a flow name (runs.direction, the record key's direction,
# reconcile_runs.flow, drift.flow): SQLite ignores it, PostgreSQL refuses a longer name, so
# flow names are checked against it.
FLOW_NAME_MAX = 20

def _record_key(index_connection: bool = False, index_source: bool = False) -> list[Column]:
    """The columns that name one source record of one connection and direction."""
    return [Column("id", Integer, primary_key=True, autoincrement=True),
            Column("connection", String(100), nullable=False, index=index_connection),
            Column("direction", String(FLOW_NAME_MAX), nullable=False),
            Column("object", String(100), nullable=False),  # the source object
            Column("source_id", String(255), nullable=False, index=index_source)]

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("connection", String(100), nullable=False, index=True),
    Column("direction", String(FLOW_NAME_MAX), nullable=False),
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
    # the latest progress of a running run's long step (migration 0006; engine/progress)
    Column("progress", JSON),
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
    Column("direction", String(FLOW_NAME_MAX), nullable=False),
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
            Column("flow", String(FLOW_NAME_MAX), nullable=False)]


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
    # the latest progress of each long step of a running reconciliation (migration 0008; engine/progress)
    Column("progress", JSON),
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

_ENGINES: dict[str, Engine] = {}

_utc = as_utc  # SQLite hands datetimes back naive; they were stored as UTC


def _iso(value: datetime | None) -> str | None:
    value = _utc(value)
    return value.isoformat() if value else None


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

