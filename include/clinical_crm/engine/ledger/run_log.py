"""Runs: one row per DAG run and direction (window, state, counts), the end of the last
completed window (where the next run starts), the data-quality summaries of a run, and the
named lock (`exclusive`) that keeps two loads of one connection and target object apart (and the
writers of a connection's GX project, `gx:<connection>`, and of its alert state,
`alerts:<connection>`, on any storage root)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Engine

from clinical_crm.engine.ledger.schema import _iso, _utc, dq_summaries, runs
from clinical_crm.times import now as _now

log = logging.getLogger(__name__)

# Run states whose window counts as done: success, and partial (deletion marks left queued)
COMPLETED_STATES = ("success", "partial")
# the read-modify-write of runs.progress: the reads of one extraction report from several threads
_PROGRESS_LOCK = threading.Lock()


class Runs:
    engine: Engine

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
                          started_at=_now(), ended_at=None, message=None, reference_prefix=reference_prefix,
                          progress=None)
            if existing:
                db.execute(update(runs).where(runs.c.id == existing).values(**values))
                return existing
            key = db.execute(insert(runs).values(connection=connection, direction=direction, dag_run_id=dag_run_id,
                                                 counts={}, **values)).inserted_primary_key
            return int(key[0]) if key else 0

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

    def set_progress(self, run_id: int, key: str, figures: dict | None) -> None:
        """Keep the latest progress of one long step of a running run (`runs.progress[key]`,
        engine.progress); None removes that step's entry. Kept when the run finishes: the page
        shows it on a running run's row, and where a failed run's steps stopped."""
        with _PROGRESS_LOCK, self.engine.begin() as db:
            current = db.execute(select(runs.c.progress).where(runs.c.id == run_id)).scalar()
            if isinstance(current, str):
                current = json.loads(current)
            current = dict(current or {})
            if figures is None:
                current.pop(key, None)
            else:
                current[key] = figures
            db.execute(update(runs).where(runs.c.id == run_id).values(progress=current or None))

    def progress(self, run_id: int) -> dict:
        """The latest progress of the run's long steps, {step: figures} ({} when none)."""
        with self.engine.connect() as db:
            value = db.execute(select(runs.c.progress).where(runs.c.id == run_id)).scalar()
        return (json.loads(value) if isinstance(value, str) else value) or {}

    def clear_progress(self, run_id: int) -> None:
        """Forget the run's progress (a retried first task starts over)."""
        with _PROGRESS_LOCK, self.engine.begin() as db:
            db.execute(update(runs).where(runs.c.id == run_id).values(progress=None))

    def run(self, run_id: int) -> dict:
        with self.engine.connect() as db:
            row = db.execute(select(runs).where(runs.c.id == run_id)).mappings().one()
        return _run_dict(row)

    def last_success_end(self, connection: str, direction: str) -> datetime | None:
        """End of the last successful window of this connection and direction (a partial run
        moved its window: what it left behind is queued, not bound to the window)."""
        with self.engine.connect() as db:
            return _utc(db.execute(last_end_query(connection, direction)).scalar())

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

    def add_dq_summary(self, run_id: int, connection: str, direction: str, object_name: str,
                       rows: int, failing_rows: int, reasons: dict[str, int], success: bool,
                       report_path: str | None) -> None:
        with self.engine.begin() as db:
            db.execute(insert(dq_summaries).values(
                run_id=run_id, connection=connection, direction=direction, object=object_name, rows=rows,
                failing_rows=failing_rows, failing_share=(failing_rows / rows) if rows else 0.0,
                reasons=reasons, success=int(success), report_path=report_path, at=_now()))


def last_end_query(connection: str, direction: str):
    """The newest completed window end of one flow: read backwards on the index (connection,
    direction, window_end) from the newest run until a completed one (migration 0007), not a
    max over every run of the flow."""
    return (select(runs.c.window_end)
            .where(runs.c.connection == connection, runs.c.direction == direction,
                   runs.c.window_end.is_not(None), runs.c.state.in_(COMPLETED_STATES))
            .order_by(runs.c.window_end.desc()).limit(1))


def _log_wait(name: str, started: float) -> None:
    waited = time.monotonic() - started
    if waited > 1:
        log.info("waited %.1f s for %s (another run held it)", waited, name)


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
        "progress": (json.loads(progress) if isinstance(progress := row.get("progress"), str) else progress) or {},
    }
