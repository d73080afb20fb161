"""The quarantine: records held back with their reasons, one open row per record, re-read by
every run until they go through; and a data engineer's decisions about them (retry / ignore)."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.run_log import COMPLETED_STATES
from clinical_crm.engine.ledger.schema import QUARANTINE_ACTIONS, quarantine, quarantine_actions, record_outcomes, runs
from clinical_crm.outcomes import Outcome
from clinical_crm.times import now as _now


class Quarantine:
    engine: Engine
    quarantine_entry: Callable[[int], dict | None]  # ledger/triage.py (the same Ledger)

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
        with self.engine.begin() as db:
            row = db.execute(select(quarantine).where(quarantine.c.id == quarantine_id)).mappings().first()
            if row is None:
                raise KeyError(quarantine_id)
            _act(db, row, action, actor, reason, _now())
        entry = self.quarantine_entry(quarantine_id)
        if entry is None:  # read above in the same call: only a concurrent delete gets here
            raise KeyError(f"quarantine entry {quarantine_id} is gone")
        return entry

    def act_on_quarantine_rows(self, quarantine_ids: Iterable[int], action: str, actor: str,
                               reason: str | None = None, chunk: int = 500) -> int:
        """The same decision about many quarantine rows (the triage page's "all records this
        filter shows"), recorded per record exactly as `act_on_quarantine` records one, `chunk`
        rows a transaction; unknown ids are skipped. Returns the rows acted on."""
        if action not in QUARANTINE_ACTIONS:
            raise ValueError(f"unknown quarantine action {action!r}")
        ids = [int(i) for i in quarantine_ids]
        done = 0
        for start in range(0, len(ids), chunk):
            now = _now()
            with self.engine.begin() as db:
                for row in db.execute(select(quarantine).where(
                        quarantine.c.id.in_(ids[start:start + chunk])).order_by(quarantine.c.id)).mappings().all():
                    _act(db, row, action, actor, reason, now)
                    done += 1
        return done

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
                      & (record_outcomes.c.outcome == Outcome.QUARANTINED))
                .join(runs, (runs.c.id == record_outcomes.c.run_id) & runs.c.state.in_(COMPLETED_STATES)
                      & (runs.c.direction == direction))
                .where(quarantine.c.connection == connection, quarantine.c.direction == direction,
                       quarantine.c.object == object_name, quarantine.c.resolved_at.is_(None))
            ).scalars())


def _act(db, row, action: str, actor: str, reason: str | None, now) -> None:
    """One decision about one quarantine row, in the caller's transaction (see act_on_quarantine)."""
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
