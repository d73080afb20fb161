"""Housekeeping: applies a connection's `retention:` to the history it accumulates, and logs
what it removed (the daily `housekeeping__<name>` DAG; `python -m clinical_crm.engine.housekeeping
<connection file>` by hand).

What grows with every run, and what is done with it:

- GX validation results and Data Docs pages: each run moves the runs older than the newest
  `data_docs_runs` out of the live project into <reports>/<name>/gx_archive (quality.py), and
  housekeeping deletes archived runs older than `gx_results_days` (and archives first, should the
  project hold more, e.g. from before this code);
- run files, <reports>/<name>/runs/<direction>/<run>.json, .quarantine.csv, .quarantine.json:
  deleted after `run_files_days` (the newest run's of each direction are kept whatever their age);
- per-record outcomes and data-quality summaries of runs started more than `outcomes_days` ago,
  except the outcomes of records with an open quarantine row (a run tells known open items from
  new ones by their `quarantined` outcome of a completed run) or a queued deletion mark, when no
  run since the cutoff gave them a newer one;
- staged files of runs that crashed or failed (a successful run removes its own): deleted when
  nothing in the run's folder changed for `staging_hours`;
- drift rows of reconciliation runs older than `drift_days` (the latest run's of each flow stay).

Never removed: the runs rows (the next window starts at the last completed one; about 1 KB a
run), the open and resolved quarantine rows and the page's decisions on them, the deletion queue,
the id map and the source versions (what the connection wrote: reconciliation and the duplicate
check rely on them). Airflow's own metadata is cleaned by `airflow db clean` (docs/operations.md).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import and_, delete, exists, func, select
from sqlalchemy.orm import aliased

from clinical_crm import settings
from clinical_crm.engine import quality, storage
from clinical_crm.engine.ledger import (COMPLETED_STATES, Ledger, deletion_queue, dq_summaries, drift, quarantine, reconcile_runs,
                                        record_outcomes, runs)
from clinical_crm.times import now as _now

log = logging.getLogger(__name__)

BATCH_RUNS = 200  # runs whose outcomes one delete statement removes (one short transaction each)


@dataclass
class Removed:
    """What one housekeeping pass removed, by kind (logged, and the task's return value)."""

    counts: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def add(self, kind: str, n: int = 1, size: int = 0) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.bytes += size

    def as_dict(self) -> dict:
        return {**self.counts, "bytes": self.bytes}


def housekeep(cfg, ledger: Ledger | None = None, now_ts: float | None = None) -> dict:
    """Apply `cfg.retention` to connection `cfg.name`; returns {kind: removed, "bytes": freed}."""
    ledger = ledger or Ledger()
    keep = cfg.retention
    now_ts = time.time() if now_ts is None else now_ts
    removed = Removed()
    gx_history(cfg.name, keep.data_docs_runs, keep.gx_results_days, now_ts, removed, ledger)
    run_files(cfg.name, keep.run_files_days, now_ts, removed)
    staged_leftovers(cfg.name, keep.staging_hours, now_ts, removed)
    ledger_history(ledger, cfg.name, keep.outcomes_days, keep.drift_days, removed)
    log.info("housekeeping of %s removed %s (%.1f MiB of files)", cfg.name,
             ", ".join(f"{n} {kind}" for kind, n in removed.counts.items()) or "nothing", removed.bytes / 2**20)
    return removed.as_dict()


# ---------------------------------------------------------------- files
#
# All of them under the storage root (engine/storage.py), through its fsspec filesystem: the
# local disk by default, object storage (S3 ...) when the root is remote. Ages are modification
# times, but a GX run's: its run time (the run-time folder GX names it by), when it reads,
# because a remote archive's objects are as new as the copy that moved them there.


def _tree(fs, path: str) -> dict[str, dict]:
    """{path: info} of a folder's files and sub-folders (the folder's own too, where it has one)."""
    found = dict(fs.find(path, withdirs=True, detail=True))
    if path not in found:
        try:
            found[path] = fs.info(path)
        except FileNotFoundError:
            pass
    return found


def _newest(infos: dict[str, dict]) -> float | None:
    stamps = [t for t in (storage.mtime(info) for info in infos.values()) if t is not None]
    return max(stamps) if stamps else None


def _size(infos: dict[str, dict]) -> int:
    return sum(int(info.get("size") or 0) for info in infos.values() if info.get("type") == "file")


def _gx_run_age(fs, run: str, infos: dict[str, dict]) -> float | None:
    """A GX run folder's age: its newest run-time folder (e.g. 20261201T100000.000000Z), else
    the newest modification time of what it holds."""
    times = []
    for child in fs.ls(run, detail=False):
        try:
            times.append(datetime.strptime(child.rstrip("/").rsplit("/", 1)[-1], "%Y%m%dT%H%M%S.%fZ")
                         .replace(tzinfo=timezone.utc).timestamp())
        except ValueError:
            pass
    return max(times) if times else _newest(infos)


def gx_history(connection: str, keep_runs: int, days: int, now_ts: float, removed: Removed,
               ledger: Ledger | None = None) -> None:
    """Archive what the live GX project holds beyond its window (under the lock the runs'
    Validator takes), then delete archived runs older than `days`."""
    url = storage.join(settings.reports_url(), connection, "gx")
    fs, root = storage.filesystem(url)
    if fs.exists(root):
        with (ledger or Ledger()).exclusive(quality.gx_lock(connection)):
            if storage.is_local(url):
                moved = quality.archive_old_runs(storage.local_folder(url), keep_runs)
            else:  # in a working copy of the live project, pushed back (moves and removals)
                with quality.WorkingCopy(url) as copy:
                    moved = quality.archive_old_runs(copy.root, keep_runs)
                    if moved:
                        copy.push()
        if moved:
            removed.add("GX runs moved out of the live project", moved)
        fs.invalidate_cache()  # the working copy's push changed the store under this listing
    archive = f"{root.rsplit('/', 1)[0]}/{quality.archive_dir(Path('gx')).name}"
    cutoff = now_ts - days * 86400
    for part in ("results", "pages"):
        base = f"{archive}/{part}"
        if not fs.isdir(base):
            continue
        for suite in fs.glob(f"{base}/" + "/".join("*" * quality.SUITE_DEPTH)):
            if not fs.isdir(suite):
                continue
            for run in fs.ls(suite, detail=False):
                infos = _tree(fs, run)
                age = _gx_run_age(fs, run, infos)
                if age is not None and age < cutoff:
                    fs.rm(run, recursive=True)
                    removed.add(f"archived GX {part} folders", 1, _size(infos))


def run_files(connection: str, days: int, now_ts: float, removed: Removed) -> None:
    """Delete <reports>/<connection>/runs/<direction>/* older than `days`; the newest run's files
    of each direction stay (an inactive connection keeps showing its last run)."""
    fs, base = storage.filesystem(storage.join(settings.reports_url(), connection, "runs"))
    if not fs.isdir(base):
        return
    cutoff = now_ts - days * 86400
    for direction in fs.ls(base, detail=True):
        if direction.get("type") != "directory":
            continue
        files = [(storage.mtime(info) or now_ts, info["name"], int(info.get("size") or 0))
                 for info in fs.ls(direction["name"], detail=True) if info.get("type") == "file"]
        if not files:
            continue
        newest = _run_key(max(files)[1])
        for mtime, path, size in files:
            if mtime < cutoff and _run_key(path) != newest:
                fs.rm_file(path)
                removed.add("run files", 1, size)


def _run_key(path: str) -> str:
    """The run of a run file: its name without .json, .quarantine.csv, .quarantine.json."""
    name = path.rsplit("/", 1)[-1]
    for suffix in (".quarantine.csv", ".quarantine.json", ".json"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def staged_leftovers(connection: str, hours: int, now_ts: float, removed: Removed) -> None:
    """Delete the staged folders <staging>/<connection>/<flow>/<run> in which nothing changed for
    `hours` (a successful run removes its own at its end: these are crashed or failed runs', kept
    meanwhile for inspection and for the retries)."""
    fs, root = storage.filesystem(f"{settings.staging_url().rstrip('/')}/{connection}")
    if not fs.exists(root):
        return
    cutoff = now_ts - hours * 3600
    for flow in fs.ls(root, detail=False):
        if not fs.isdir(flow):
            continue
        for run in fs.ls(flow, detail=False):
            infos = _tree(fs, run)
            newest = _newest(infos)
            if newest is not None and newest < cutoff:
                fs.rm(run, recursive=True)
                removed.add("staged runs", 1, _size(infos))


# ---------------------------------------------------------------- the ledger


def _chunks(values: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def ledger_history(ledger: Ledger, connection: str, outcomes_days: int, drift_days: int, removed: Removed) -> None:
    """Outcomes and DQ summaries of the runs started before the cutoff (not those an open
    quarantine row or a pending deletion mark needs), drift of old reconciliation runs."""
    cutoff = _now() - timedelta(days=outcomes_days)
    with ledger.engine.connect() as db:
        old_runs = list(db.execute(select(runs.c.id).where(runs.c.connection == connection,
                                                           runs.c.started_at < cutoff).order_by(runs.c.id)).scalars())
    # A record held in quarantine is known as an open item by a `quarantined` outcome of a
    # completed run (accepted_quarantine_ids): its old outcomes stay unless a run since the cutoff
    # gave it one. A record with a queued deletion mark keeps its old outcomes unless a run since
    # gave it any. (Not all of them: a record open for months gets an outcome every run.)
    recent = aliased(record_outcomes)
    recent_run = aliased(runs)
    same_record = [recent.c.connection == record_outcomes.c.connection, recent.c.object == record_outcomes.c.object,
                   recent.c.source_id == record_outcomes.c.source_id]
    recent_runs = select(recent_run.c.id).where(recent_run.c.connection == connection, recent_run.c.started_at >= cutoff)
    requarantined = exists().where(*same_record, recent.c.outcome == "quarantined",
                                   recent.c.run_id.in_(recent_runs.where(recent_run.c.state.in_(COMPLETED_STATES))))
    touched_since = exists().where(*same_record, recent.c.run_id.in_(recent_runs))
    still_needed = [
        ~and_(exists().where(quarantine.c.connection == record_outcomes.c.connection,
                             quarantine.c.direction == record_outcomes.c.direction,
                             quarantine.c.object == record_outcomes.c.object,
                             quarantine.c.source_id == record_outcomes.c.source_id,
                             quarantine.c.resolved_at.is_(None)), ~requarantined),
        ~and_(exists().where(deletion_queue.c.connection == record_outcomes.c.connection,
                             deletion_queue.c.direction == record_outcomes.c.direction,
                             deletion_queue.c.object == record_outcomes.c.object,
                             deletion_queue.c.source_id == record_outcomes.c.source_id,
                             deletion_queue.c.state == "pending"), ~touched_since),
    ]
    for ids in _chunks(old_runs, BATCH_RUNS):
        with ledger.engine.begin() as db:
            gone = db.execute(delete(record_outcomes).where(record_outcomes.c.run_id.in_(ids), *still_needed)).rowcount
            if gone:
                removed.add("record outcomes", gone)
            gone = db.execute(delete(dq_summaries).where(dq_summaries.c.run_id.in_(ids))).rowcount
            if gone:
                removed.add("DQ summaries", gone)
    drift_cutoff = _now() - timedelta(days=drift_days)
    with ledger.engine.begin() as db:
        latest = select(func.max(reconcile_runs.c.id)).where(
            reconcile_runs.c.connection == connection).group_by(reconcile_runs.c.flow)
        old_reconciles = select(reconcile_runs.c.id).where(
            and_(reconcile_runs.c.connection == connection, reconcile_runs.c.started_at < drift_cutoff,
                 reconcile_runs.c.id.not_in(latest)))
        gone = db.execute(delete(drift).where(drift.c.connection == connection,
                                              drift.c.run_id.in_(old_reconciles))).rowcount
        if gone:
            removed.add("drift rows", gone)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from clinical_crm import config

    parser = argparse.ArgumentParser(prog="python -m clinical_crm.engine.housekeeping",
                                     description="apply a connection file's retention now")
    parser.add_argument("connection_file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(housekeep(config.load_connection(args.connection_file)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
