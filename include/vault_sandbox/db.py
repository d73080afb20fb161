"""SQLite storage of one sandbox vault: one table per object, one column per field.

Values are stored the way they sort and compare in VQL: datetimes as
'YYYY-MM-DDTHH:MM:SS.000Z' text, dates as 'YYYY-MM-DD', booleans as 0/1, picklists as their
API name.
"""
from __future__ import annotations

import threading
from datetime import datetime, timezone

from sqlalchemy import (Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, select, text, update)
from sqlalchemy.engine import Engine

from vault_sandbox.models import VaultModel

OBJECT_TYPES = "_object_types"     # object types; queried through object_type__vr
DELETIONS = "_deletions"
CREDENTIALS = "_credentials"
SEQUENCES = "_sequences"
SETTINGS = "_settings"


def vault_datetime(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def now_text() -> str:
    return vault_datetime(datetime.now(timezone.utc))


def _column(field) -> Column:
    kind = {"boolean": Boolean, "number": Float}.get(field.type, Text if field.type == "long_text" else String)
    return Column(field.name, kind(), primary_key=field.name == "id")


def build_metadata(model: VaultModel) -> MetaData:
    md = MetaData()
    for obj in model.objects.values():
        table = Table(obj.name, md, *(_column(f) for f in obj.fields.values()))
        # Indexes the queries and writes need: windows by date, unique and reference lookups.
        for f in obj.fields.values():
            if f.name == "id":
                continue
            if f.unique:
                Index(f"uq_{obj.name}_{f.name}", table.c[f.name], unique=True)
            elif f.type == "object" or f.name in ("modified_date__v", "created_date__v"):
                Index(f"ix_{obj.name}_{f.name}", table.c[f.name])
        Index(f"ix_{obj.name}_modified_id", table.c.modified_date__v, table.c.id)
    Table(OBJECT_TYPES, md, Column("id", String, primary_key=True), Column("object_name", String),
          Column("api_name__v", String), Column("label__v", String))
    deletions = Table(DELETIONS, md, Column("seq", Integer, primary_key=True, autoincrement=True),
                      Column("object_name", String), Column("id", String), Column("global_id__sys", String),
                      Column("link__sys", String), Column("date_deleted", String))
    Index("ix_deletions_object_date", deletions.c.object_name, deletions.c.date_deleted)
    Table(CREDENTIALS, md, Column("user_id", String, primary_key=True), Column("password", String))
    Table(SEQUENCES, md, Column("prefix", String, primary_key=True), Column("next_value", Integer))
    Table(SETTINGS, md, Column("key", String, primary_key=True), Column("value", String))
    return md


class Store:
    """Engine, tables and id allocation of one vault's database file."""

    def __init__(self, model: VaultModel, db_path: str):
        self.model = model
        self.engine: Engine = create_engine(f"sqlite:///{db_path}", connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self.metadata = build_metadata(model)
        self.metadata.create_all(self.engine)
        self._add_new_columns()
        self.tables = self.metadata.tables
        # SQLite has one writer; a lock keeps write transactions from failing on "database is locked".
        self.write_lock = threading.Lock()
        self._ensure_object_types()

    def _add_new_columns(self) -> None:
        """A database made under an older model gets the fields added since as empty columns
        (create_all only creates missing tables); columns the model dropped stay, unused."""
        inspector = inspect(self.engine)
        with self.engine.begin() as conn:
            for table in self.metadata.sorted_tables:
                present = {c["name"] for c in inspector.get_columns(table.name)}
                for column in table.columns:
                    if column.name not in present:
                        kind = column.type.compile(self.engine.dialect)
                        conn.execute(text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'))

    def table(self, name: str) -> Table:
        return self.tables[name]

    def _ensure_object_types(self) -> None:
        table = self.tables[OBJECT_TYPES]
        with self.engine.begin() as conn:
            existing = {(r.object_name, r.api_name__v) for r in conn.execute(select(table))}
            rows = []
            for obj in self.model.objects.values():
                for api_name, label in obj.object_types.items():
                    if (obj.name, api_name) not in existing:
                        rows.append({"object_name": obj.name, "api_name__v": api_name, "label__v": label})
            if rows:
                ids = self.allocate_ids(conn, "OOT", len(rows))
                for row, new_id in zip(rows, ids):
                    row["id"] = new_id
                conn.execute(table.insert(), rows)
        with self.engine.connect() as conn:
            self.object_types = {(r.object_name, r.api_name__v): r.id for r in conn.execute(select(table))}
        self.object_type_names = {v: k for k, v in self.object_types.items()}

    def object_type_id(self, object_name: str, api_name: str) -> str | None:
        return self.object_types.get((object_name, api_name))

    def allocate_ids(self, conn, prefix: str, count: int) -> list[str]:
        seq = self.tables[SEQUENCES]
        current = conn.execute(select(seq.c.next_value).where(seq.c.prefix == prefix)).scalar()
        if current is None:
            current = 1
            conn.execute(seq.insert().values(prefix=prefix, next_value=current + count))
        else:
            conn.execute(update(seq).where(seq.c.prefix == prefix).values(next_value=current + count))
        return [f"{prefix}{n:013d}" for n in range(current, current + count)]

    def global_id(self, record_id: str) -> str:
        return f"{self.model.vault_id}_{record_id}"

    def data_vault_id(self) -> str | None:
        """The vault id the stored records were written under (from a user's global id; None when
        the database holds no users)."""
        users = self.tables["user__sys"]
        with self.engine.connect() as conn:
            global_id = conn.execute(select(users.c.global_id__sys).limit(1)).scalar()
        return global_id.split("_", 1)[0] if global_id else None

    def clear(self) -> None:
        """Drop every row (used before re-seeding)."""
        with self.engine.begin() as conn:
            for table in reversed(self.metadata.sorted_tables):
                if table.name != OBJECT_TYPES:
                    conn.execute(table.delete())
        self._ensure_object_types()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # 256 MB page cache (allocated as used): seeding transactions spill less, and at 1,000,000 records
    # the indexes of a table stay in memory while writes touch them at random
    cursor.execute("PRAGMA cache_size=-262144")
    # Checkpoint the WAL every 30,000 pages (~120 MB) instead of 1,000: a 500-record write dirties
    # about a thousand index pages, so the default copied them back into the file on nearly every
    # commit. Replaying the 2,000 interaction writes of a 1,000,000 run: 133 s -> 87 s.
    cursor.execute("PRAGMA wal_autocheckpoint=30000")
    cursor.execute("PRAGMA journal_size_limit=67108864")   # the log file shrinks back to 64 MB after it
    cursor.close()
