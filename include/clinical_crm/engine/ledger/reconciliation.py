"""Reconciliation (engine/reconcile.py): one `reconcile_runs` row per flow per reconcile DAG
run with its summary, and the `drift` rows it found (records that differ from what the source
says the target should hold), stamped when repaired."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.schema import _iso, deletion_queue, drift, id_map, reconcile_runs
from clinical_crm.times import now as _now


class Reconciliation:
    engine: Engine

    def start_reconcile(self, connection: str, flow: str, dag_run_id: str, repair: bool) -> int:
        with self.engine.begin() as db:
            key = db.execute(insert(reconcile_runs).values(
                connection=connection, flow=flow, dag_run_id=dag_run_id, repair=int(repair), state="running",
                summary={}, started_at=_now())).inserted_primary_key
            return int(key[0]) if key else 0

    def finish_reconcile(self, run_id: int, state: str, summary: dict | None = None, message: str | None = None) -> None:
        values: dict[str, Any] = dict(state=state, ended_at=_now(), message=message)
        if summary is not None:
            values["summary"] = summary
        with self.engine.begin() as db:
            db.execute(update(reconcile_runs).where(reconcile_runs.c.id == run_id).values(**values))

    def written_or_marked(self, connection: str, direction: str, source_object: str, target_objects: Iterable[str],
                          source_ids: Iterable[str]) -> set[str]:
        """Which of these source records the connection is answerable for whatever their age: it
        wrote their target record (the id map of `target_objects`) or queued their deletion mark
        (the deletion queue of the flow's `source_object`). Reconciliation's scope (IN chunks of 500)."""
        ids, objects = sorted({str(s) for s in source_ids}), sorted(set(target_objects))
        found: set[str] = set()
        with self.engine.connect() as db:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                if objects:
                    found.update(db.execute(select(id_map.c.source_id).where(
                        id_map.c.connection == connection, id_map.c.object.in_(objects),
                        id_map.c.target_id.is_not(None), id_map.c.source_id.in_(chunk))).scalars())
                found.update(db.execute(select(deletion_queue.c.source_id).where(
                    deletion_queue.c.connection == connection, deletion_queue.c.direction == direction,
                    deletion_queue.c.object == source_object, deletion_queue.c.source_id.in_(chunk))).scalars())
        return found

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
