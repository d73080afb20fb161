"""Reconciliation (engine/reconcile.py): one `reconcile_runs` row per flow per reconcile DAG
run with its summary and the latest progress of its long steps while it runs, and the `drift`
rows it found (records that differ from what the source says the target should hold), stamped
when repaired."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.schema import _iso, deletion_queue, drift, id_map, reconcile_runs
from clinical_crm.times import now as _now

# the read-modify-write of reconcile_runs.progress: the reads of a reconciliation report from several threads
_PROGRESS_LOCK = threading.Lock()


def _json(value) -> dict:
    return (json.loads(value) if isinstance(value, str) else value) or {}


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

    def set_reconcile_progress(self, run_id: int, key: str, figures: dict | None) -> None:
        """Keep the latest progress of one long step of a running reconciliation
        (`reconcile_runs.progress[key]`, engine.progress: its reads, validation, comparison and
        repair); None removes that step's entry. Kept when it ends (where a failed one stopped)."""
        with _PROGRESS_LOCK, self.engine.begin() as db:
            current = dict(_json(db.execute(select(reconcile_runs.c.progress)
                                            .where(reconcile_runs.c.id == run_id)).scalar()))
            if figures is None:
                current.pop(key, None)
            else:
                current[key] = figures
            db.execute(update(reconcile_runs).where(reconcile_runs.c.id == run_id).values(progress=current or None))

    def reconcile_progress(self, run_id: int) -> dict:
        """The latest progress of a reconciliation's long steps, {step: figures} ({} when none)."""
        with self.engine.connect() as db:
            return _json(db.execute(select(reconcile_runs.c.progress).where(reconcile_runs.c.id == run_id)).scalar())

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
        """Reconcile runs with their summaries and latest progress, newest first."""
        query = select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(limit)
        if connection:
            query = query.where(reconcile_runs.c.connection == connection)
        with self.engine.connect() as db:
            return [{**dict(r), "run_id": r["id"], "repair": bool(r["repair"]), "summary": r["summary"] or {},
                     "progress": _json(r["progress"]),
                     "started_at": _iso(r["started_at"]), "ended_at": _iso(r["ended_at"])}
                    for r in db.execute(query).mappings()]
