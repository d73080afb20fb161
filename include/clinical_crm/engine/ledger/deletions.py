"""The deletion queue: every deleted source record whose target record gets a deletion mark,
pending until the mark is written (re-driven by every run), then applied, so each is marked
once and none is forgotten."""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.records import _fields
from clinical_crm.engine.ledger.schema import deletion_queue
from clinical_crm.outcomes import MARK_APPLIED, RecordResult
from clinical_crm.times import now as _now


class Deletions:
    engine: Engine

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
            known: set[str] = set()
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

    def settle_deletions(self, connection: str, direction: str, object_name: str,
                         outcomes: Iterable[RecordResult | dict], no_target: Iterable[str] = (),
                         run_id: int | None = None) -> None:
        """Record what this run's attempt did: applied (marked now or found marked), still pending
        after a failure (counted in `attempts`, with the vault's error), or no target record."""
        now = _now()
        rows = []
        for o in map(_fields, outcomes):
            applied = o["outcome"] in MARK_APPLIED
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

    def deletion_entries(self, connection: str, direction: str, object_name: str) -> dict[str, dict]:
        """Every queued deletion of a source object, by global id: source_id, state, expected."""
        with self.engine.connect() as db:
            return {str(r["global_id"]): dict(r) for r in db.execute(
                select(deletion_queue.c.global_id, deletion_queue.c.source_id, deletion_queue.c.state,
                       deletion_queue.c.expected).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == object_name, deletion_queue.c.global_id.is_not(None))).mappings()}
