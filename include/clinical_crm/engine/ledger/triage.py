"""Quarantine triage on the page: plain dicts, paged in SQL (LIMIT/OFFSET; the CSV export walks
the filtered set by id, a chunk at a time), so 100,000 open rows cost one page of rows per request."""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

from sqlalchemy import Text, cast, func, select
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.schema import _iso, quarantine
from clinical_crm.times import now as _now


class Triage:
    engine: Engine

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

    def quarantine_ids(self, connection: str, object_name: str | None = None, rule: str | None = None,
                       min_age_days: int | None = None) -> list[tuple[int, str]]:
        """(id, direction) of every open quarantine row matching the filters of `quarantine_page`,
        oldest first (a bulk action's rows: two small columns, not the rows)."""
        query = (select(quarantine.c.id, quarantine.c.direction)
                 .where(*_quarantine_filter(connection, object_name, rule, min_age_days)).order_by(quarantine.c.id))
        with self.engine.connect() as db:
            return [(int(i), str(d)) for i, d in db.execute(query)]

    def quarantine_directions(self, connection: str, object_name: str | None = None, rule: str | None = None,
                              min_age_days: int | None = None) -> set[str]:
        """The directions of the open quarantine rows matching the filters (whose DAGs a bulk
        action needs edit permission on)."""
        query = select(quarantine.c.direction).distinct().where(
            *_quarantine_filter(connection, object_name, rule, min_age_days))
        with self.engine.connect() as db:
            return set(db.execute(query).scalars())

    def quarantine_objects(self, connection: str) -> list[str]:
        """The objects with open quarantine rows in a connection (the triage filter's choices)."""
        with self.engine.connect() as db:
            return sorted(db.execute(select(quarantine.c.object).distinct().where(
                quarantine.c.connection == connection, quarantine.c.resolved_at.is_(None))).scalars())


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
