"""The read API of runs and records (the Airflow UI plugin, engineers): plain dicts."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.run_log import _run_dict, last_end_query
from clinical_crm.engine.ledger.schema import (_iso, dq_summaries, id_map, quarantine, quarantine_actions,
                                               record_outcomes, runs, source_versions)
from clinical_crm.engine.ledger.triage import _quarantine_dict


class Views:
    engine: Engine

    def recent_runs(self, connection: str | None = None, limit: int = 20) -> list[dict]:
        """The latest runs, newest first (all connections when `connection` is None)."""
        query = select(runs).order_by(runs.c.id.desc()).limit(limit)
        if connection:
            query = query.where(runs.c.connection == connection)
        with self.engine.connect() as db:
            return [_run_dict(r) for r in db.execute(query).mappings()]

    def last_success_ends(self, connection: str) -> dict[str, str]:
        """{direction: end of its last successful window} of a connection (ISO, UTC)."""
        ends: dict[str, str] = {}
        with self.engine.connect() as db:
            for direction in distinct(db, runs.c.direction, runs.c.connection == connection):
                end = db.execute(last_end_query(connection, direction)).scalar()
                if (iso := _iso(end)) is not None:
                    ends[direction] = iso
        return ends

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
            names = distinct(db, runs.c.connection)
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


def distinct(db, column, *where) -> list[str]:
    """The distinct values of an indexed column, in order, one index lookup each (the next value
    after the last): a handful of connections or flows, never a scan of every run (SELECT
    DISTINCT reads every row of the index, which grows with each run)."""
    values: list[str] = []
    while True:
        after = [column > values[-1]] if values else []
        value = db.execute(select(func.min(column)).where(*where, *after)).scalar()
        if value is None:
            return values
        values.append(value)
