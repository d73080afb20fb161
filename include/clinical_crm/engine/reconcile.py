"""Reconciliation: what the target vault should hold, computed from the source records the
connection is answerable for by the flow's own rules, compared record by record with what it
holds; each difference (drift) goes to the ledger (`drift`, `reconcile_runs`) and, with repair,
the newest version is re-sent.

This module owns the comparison, the drift kinds and the repair. It works from the Flow
declarations only (no direction is named here):

* source: the flow's own reads (engine.plan) over the whole history instead of a window (the
  deletions: since the connection's start date), narrowed to the connection's scope (below),
  then the flow's quality checks: a record failing them is expected absent (quarantined),
  never drift; the valid rows become target records by `runner.transform`, i.e. by each
  `Target.build` (and `prepare`, as the load sends them);
* target: every record of the target object (`Target.where`) carrying an external id of this
  source vault (`{vault id}_...`), read in external-id order (`ORDER BY`, paged) and merged with
  the expected records sorted the same way (an external sort of the staged records in runs, on
  local scratch): memory follows the page and the runs' read-ahead, not the number of records;
* deletions: a target record with no source record in that read, and none found by its global
  id either (a record changed since the read, or no longer selected, e.g. a call unflagged, is
  no deletion: the connection leaves those alone), lost its source. It is a deletion the
  connection must mark when the ledger's deletion queue, the vault's deletions since the start
  date (staged by the extraction) or the ledger's id map (the connection wrote it) know the
  record; `DeletionMark.carried` (or the value the ledger says the mark wrote) says whether the
  target carries the mark.

Scope (docs/pipeline.md, Reconciliation): a source record is the connection's when it changed
at or after `schedule.start_date` (its modified date), when the ledger says the connection
wrote its target record (id map) or queued its deletion mark (deletion queue), or (a
`Referenced` read: studies, sites) when an in-scope record refers to it. Other source records
are neither compared nor written, and their target records are not reported. A target record
whose source record is gone is reported only when the ledger knows it (then its mark is
checked) or, as extra, when it was modified at or after the start date: one older is history
the connection never touched.

Drift kinds, per target record (external id = the source's global id):
  missing                a valid source record in scope has no target record
  stale                  target fields differ from what the rules give (fields, both values)
  extra                  an external id of this source vault with no source record, which the
                         connection never wrote nor saw deleted, modified since the start
                         date; reported, never deleted
  missing_deletion_mark  the source record was deleted but the target lacks its mark

Repair (`repair=True`): missing and stale records are upserted (engine.load.upsert, with the
version guard), missing marks applied (engine.load.mark_deleted, recorded in the deletion
queue so no later run marks them again); each repaired drift row gets `repaired_at`.
"""
from __future__ import annotations

import gc
import heapq
import logging
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import pandas as pd

from clinical_crm.engine import load, plan, quality, runner, staging
from clinical_crm.engine.context import RunContext, Staged, StagedFile
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.plan import Reading
from clinical_crm.engine.progress import Progress, Writer, for_reconcile_run
from clinical_crm.engine.windows import Window
from clinical_crm.flows.base import (SOURCE_ID, SOURCE_VERSION, VALID, Deleted, DeletionMark, Flow, Referenced, Target,
                                     Validation)
from clinical_crm.values import blank, text
from clinical_crm.vault import Query
from clinical_crm.vault.fields import GLOBAL_ID, ID, MAX_BATCH, MODIFIED_DATE

log = logging.getLogger(__name__)

KINDS = ("missing", "stale", "extra", "missing_deletion_mark")
RESENT = ("missing", "stale")
EVER = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the start of the "window" of every source record
SHOWN = 20  # drift rows written to the task log per target
RUN_ROWS = 25_000  # rows of one sorted run of the external sort (sorted in memory at once)
MERGE_ROWS = 500  # rows each sorted run reads ahead while they are merged
VALIDATE_ROWS = 100_000  # rows GX validates at once (its memory follows the block)


value = load.compared  # a field value as compared (one rule for the load and reconciliation)


@contextmanager
def _whole_history_deletions() -> Iterator[None]:
    """The extraction warns that deletions before Vault's 30 days cannot be read; over the whole
    history that is expected (reconciliation finds those by absence), so the warning is dropped."""
    logger = logging.getLogger("clinical_crm.engine.extract")
    drop = logging.Filter()
    drop.filter = lambda record: not str(record.msg).startswith("deletions of %s between")  # type: ignore[method-assign]
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ---------------------------------------------------------------- the source side


def _valid_rows(flow: Flow, cfg, staged: Staged, run_dir: str, progress: Writer | None = None) -> Staged:
    """The validated object's rows that pass the flow's quality rules (with the matched target
    id column), judged as the runner's validate step judges them, without touching the
    quarantine or the Data Docs (an ephemeral GX context). The rules judge each row on its own
    (against the reference reads), so reconciliation validates VALIDATE_ROWS rows at a time:
    GX's copies of one whole check frame grew with N (+860 MiB at 1,000,000 rows, measured)."""
    v = flow.validation
    if v is None:
        return Staged()
    rows = staged[v.read] if v.read in staged else None
    done = Progress(f"validate {v.object}", rows.rows if rows is not None else 0, writer=progress, logger=log)
    # GX's modules and registries (most of its ~140 MiB) before any block: they then fill the heap
    # the reads left free instead of being scattered between the first block's rows
    quality.import_gx()
    reference = runner.references(v, staged)
    good = staging.FrameWriter(f"{run_dir}/{v.read}.valid.parquet")
    with done:
        for block, n in _blocks(rows, f"{run_dir}/{v.read}.block", VALIDATE_ROWS):
            _judge_block(block, v, cfg, reference, good)
            release_memory()
            done.advance(n)
    return Staged({VALID: good.close()})


def _judge_block(block: str | None, v: Validation, cfg, reference: dict, good: staging.FrameWriter) -> None:
    """One block's verdict, its valid rows written to `good`. A function of its own so that
    nothing of the block outlives it (the last chunk written, the verdict) while the next one is
    validated. A fresh ephemeral GX context a block: one context kept what each validation left
    (+170 MiB over the ten blocks of 1,000,000 rows, measured)."""
    checked = quality.CheckedRows(block, v.matched_column)
    verdict = checked.judge(quality.Validator(cfg.name, "reconcile", stored=False), v.object, v.rules,
                            lambda chunk: v.checks(chunk, reference))
    for chunk, bad in checked.chunks(verdict):
        good.write(chunk[~bad])


def _blocks(staged: StagedFile | None, prefix: str, rows: int) -> Iterator[tuple[str | None, int]]:
    """A staged file as files of at most `rows` rows (the file itself when it is that small),
    with their rows. The last chunk read is let go before a block is yielded: it would stay
    alive in this generator's frame (20,000 rows of Python strings) while the block is validated."""
    if staged is None or staged.rows <= rows:
        yield (staged.path, staged.rows) if staged is not None else (None, 0)
        return
    writer, i = None, 0
    for chunk in staging.read_chunks(staged.path, chunk_rows=min(staging.CHUNK_ROWS, rows)):
        if writer is None:
            writer = staging.FrameWriter(f"{prefix}{i}.parquet")
        writer.write(chunk)
        if writer.rows >= rows:
            del chunk
            block = writer.close()
            yield block.path, block.rows
            writer, i = None, i + 1
    chunk = None
    if writer is not None:
        block = writer.close()
        yield block.path, block.rows


def release_memory() -> None:
    """Return the heap a finished step left free to the system: Python's cycles collected, the
    pages Arrow's pool and glibc's arenas hold free given back (`malloc_trim`; without glibc,
    e.g. musl or macOS, only the collection). RSS otherwise keeps the high-water mark of every
    block, each one's free heap scattered between the objects that stay."""
    gc.collect()
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    if _libc is not None:
        _libc.malloc_trim(0)


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_libc = _glibc()


def _global_ids(path: str | None) -> dict[str, str]:
    """{global id: id} of a staged source file (the small ones: deleted ids)."""
    found: dict[str, str] = {}
    for chunk in staging.read_chunks(path):
        found.update(zip(map(str, chunk[GLOBAL_ID]), map(str, chunk[ID])))
    return found


def _id_set(path: str | None) -> staging.IdSet:
    """The global ids of a staged source file, compactly (every source record, at any N)."""
    found = staging.IdSet()
    for chunk in staging.read_columns(path, [GLOBAL_ID]):
        if GLOBAL_ID in chunk:
            found.add(chunk[GLOBAL_ID].dropna())
    return found


# ---------------------------------------------------------------- the connection's scope


def changed_since(frame: pd.DataFrame, start: datetime, column: str = MODIFIED_DATE) -> pd.Series:
    """Which rows were modified at or after `start` (a row without a modified date counts as
    changed: nothing says it is history)."""
    if column not in frame:
        return pd.Series(True, index=frame.index)
    moments = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
    return ~(moments < start)


def answerable_reads(flow: Flow) -> dict[str, list[str]]:
    """{read name: the target objects its records go to}: the reads narrowed to the scope."""
    found: dict[str, list[str]] = {}
    for t in flow.targets:
        name = flow.validation.read if t.source == VALID and flow.validation else t.source
        found.setdefault(name, []).append(t.target_object)
    return found


def _collected(files: dict[str, StagedFile], read: str, column: str) -> set[str]:
    """The non-blank values of one column of a staged read (what it collects for later reads)."""
    found: set[str] = set()
    for chunk in staging.read_columns(files[read].path if read in files else None, [column]):
        if column in chunk:
            found.update(str(v) for v in chunk[column] if not blank(v))
    return found


def in_scope(flow: Flow, cfg, ledger: Ledger, staged: Staged, run_dir: str, start: datetime) -> Staged:
    """The staged reads, those whose records become target records narrowed to the connection's
    scope: changed at or after `start`, or written or marked by the connection (the ledger), or
    (a Referenced read) referred to by the narrowed records of the reads it needs. Reads are
    narrowed in the order of their needs, so sites are those of the activities in scope, studies
    those of both. Lookups, deletions and `known` files stay as read."""
    answerable = answerable_reads(flow)
    collectors = {value: (r.name, column) for r in flow.reads for value, column in getattr(r, "collects", {}).items()}
    depth = plan.depths(flow.reads)
    files = dict(staged.files)
    for read in sorted(flow.reads, key=lambda r: depth[r.name]):
        source_object = getattr(read, "object", None)  # a Lookup has none (it never becomes target records)
        if read.name not in answerable or read.name not in files or not source_object:
            continue
        references = read.references if isinstance(read, Referenced) else ()
        objects = answerable[read.name]
        files[read.name] = _narrow(
            files[read.name], f"{run_dir}/{read.name}.in_scope.parquet", start,
            lambda refs=references: set().union(*(_collected(files, *collectors[v]) for v in refs if v in collectors)),
            lambda ids, o=source_object, t=objects: ledger.written_or_marked(cfg.name, flow.name, o, t, ids))
    return Staged(files)


def _narrow(staged: StagedFile, path: str, start: datetime, referenced_by_scope, written) -> StagedFile:
    """One staged read restricted to the scope; the file as read when every record changed since
    `start` (a pass over the modified dates only). `referenced_by_scope()`: the global ids the
    narrowed reads before it refer to; `written(ids)`: those of these source ids the ledger knows."""
    older = sum(int((~changed_since(c, start)).sum()) for c in staging.read_columns(staged.path, [MODIFIED_DATE]))
    if not older:
        return staged
    referenced: set[str] = referenced_by_scope()
    writer, kept = staging.FrameWriter(path), 0
    for chunk in staging.read_chunks(staged.path):
        keep = changed_since(chunk, start)
        if referenced and GLOBAL_ID in chunk:
            keep |= chunk[GLOBAL_ID].isin(referenced)
        if not keep.all():
            known = written([str(i) for i in chunk.loc[~keep, ID]])
            if known:
                keep |= chunk[ID].isin(known)
        kept += int(keep.sum())
        writer.write(chunk[keep])
    narrowed = writer.close()
    log.info("scope: %d of %d records of %s changed before the start date %s and not the connection's: left out",
             staged.rows - kept, staged.rows, path.rsplit("/", 1)[-1].removesuffix(".in_scope.parquet"),
             start.isoformat())
    return narrowed


def expected_records(target: Target, records: Staged) -> Iterator[dict]:
    """The records the load would send, from the target's staged records (streamed: memory
    follows the chunk)."""
    for chunk in staging.read_chunks(records.path(target.records)):
        for record in staging.records(chunk):
            yield target.prepare(record) if target.prepare is not None else record


def sorted_rows(path: str | None, key: str, scratch: str) -> Iterator[dict]:
    """The rows of a staged file as dicts in `key` order (binary order of UTF-8, i.e. Python's
    string order, as the vault's ORDER BY gives it). An external sort: RUN_ROWS rows at a time
    are sorted into a run file in the local folder `scratch`, written in row groups of
    MERGE_ROWS, then the runs are merged reading one row group of each at a time, so memory
    follows RUN_ROWS and (number of runs x MERGE_ROWS), not the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs = []
    for i, chunk in enumerate(staging.read_chunks(path, chunk_rows=RUN_ROWS)):
        table = pa.Table.from_pandas(chunk, preserve_index=False)
        del chunk
        table = table.sort_by([(key, "ascending")], null_placement="at_start")
        runs.append(f"{scratch}/run{i}.parquet")
        pq.write_table(table, runs[-1], row_group_size=MERGE_ROWS)
        del table

    def rows(run: str) -> Iterator[dict]:
        for batch in pq.ParquetFile(run, pre_buffer=False).iter_batches(batch_size=MERGE_ROWS):
            yield from batch.to_pylist()

    yield from heapq.merge(*map(rows, runs), key=lambda r: _key(r.get(key)))


def _key(value) -> str:
    return "" if value is None else str(value)


def compared_fields(target: Target, records: Staged) -> list[str]:
    """The fields the target's records carry (the columns of its staged records)."""
    first = next(staging.read_chunks(records.path(target.records), chunk_rows=1), None)
    columns = set(first.columns) if first is not None else set()
    return sorted(columns - {SOURCE_ID, SOURCE_VERSION, target.id_param})


# ---------------------------------------------------------------- the target side


def target_records(client, target: Target, cfg, fields: list[str], prefix: str,
                   progress: Progress | None = None) -> Iterator[dict]:
    """Every target record carrying an external id of the source vault, in external-id order
    (ORDER BY the external id field, paged: one page in memory, the next one read ahead);
    `progress` counts the rows of each page read against the query's total."""
    id_param = target.id_param
    query = Query.select(target.target_object, list(dict.fromkeys([ID, id_param, *fields])))
    where = target.where
    query = (query.filter(where) if where else query).ordered(id_param).paged(cfg.load.query_page_size)
    for i, page in enumerate(client.query(query)):
        if progress is not None:
            if i == 0:
                progress.add_total(getattr(page, "total", None))  # the query's responseDetails.total
            progress.advance(len(page.records))
        for r in page.records:
            if (text(r.get(id_param)) or "").startswith(prefix):
                yield r


class _OutOfOrder(Exception):
    """The target's ORDER BY gave an order other than Python's string order."""


def carries_mark(mark: DeletionMark, row: dict, entry: dict | None) -> bool:
    """Does the target row carry the deletion mark? It holds the values the connection wrote as
    the mark (the ledger's `expected`), or passes the mark's own test (`carried`, else: it holds
    what `change` gives)."""
    if load.holds_mark(mark, row, (entry or {}).get("expected")):
        return True
    return mark.carried is not None and mark.carried(row)


# ---------------------------------------------------------------- comparing


def differences(record: dict, row: dict, fields: list[str]) -> dict:
    """{field: {expected, actual}} where the target row differs from the record the load sends
    (an unset reference is not sent, so not compared)."""
    return {f: {"expected": value(record.get(f)), "actual": value(row.get(f))} for f in fields
            if not ("." in f and value(record.get(f)) is None) and value(record.get(f)) != value(row.get(f))}


class TargetCheck:
    """Reconciles one Target of one flow: `drift()` compares, `repair(drift)` re-sends.

    `staged`: the reads as read (every source record: a target record whose source record exists
    lost nothing, in scope or not); `records`: the target records of the source records in scope;
    `start`: the connection's start date (an unknown target record older than it is history);
    `progress`: where the progress of the comparison (`compare <target object>`: target records
    read of the query's total) and of the repair (`repair <target object>`: records answered)
    goes besides the task log (engine.progress: e.g. the reconciliation's ledger row)."""

    FLUSH = 1_000  # target records without an expected record, checked against the sources together

    def __init__(self, flow: Flow, target: Target, cfg, clients: dict, ledger: Ledger, staged: Staged,
                 records: Staged, start: datetime = EVER, progress: Writer | None = None):
        self.flow, self.target, self.cfg, self.ledger, self.start = flow, target, cfg, ledger, start
        self.progress = progress
        self.client, self.source_client = clients[flow.target_side], clients[flow.source_side]
        self.prefix = f"{clients[flow.source_side].vault_id}_"
        self.source_object, self.target_object = target.source_object, target.target_object
        self.id_param = target.id_param
        source = flow.validation.read if target.source == VALID and flow.validation else target.source
        self.sources = _id_set(staged.path(source))  # valid or not, in scope or not: the source record exists
        self.records = records
        self.expected = 0  # records the source says the target holds, counted by drift()
        self.in_target = 0  # target records carrying an external id of the source vault
        self.resend: dict[str, dict] = {}  # {external id: record} of the missing and stale ones
        self.marks = [m for m in flow.deletions if m.target_object == self.target_object
                      and m.source_object == self.source_object]
        self.deleted: dict[str, str] = {}  # {global id: source id} the vault reports deleted since the start
        for mark in self.marks:
            self.deleted.update(_global_ids(staged.path(mark.staged)))
        self.entries = ledger.deletion_entries(cfg.name, flow.name, self.source_object)
        self.fields = compared_fields(target, records)
        self.read = list(dict.fromkeys([*self.fields, *(f for m in self.marks for f in m.read_fields), MODIFIED_DATE]))

    def source_id(self, external_id: str) -> str:
        entry = self.entries.get(external_id)
        return entry["source_id"] if entry else self.deleted.get(external_id, external_id.removeprefix(self.prefix))

    def _expected(self) -> Iterator[tuple[str, dict]]:
        prepare = self.target.prepare
        with tempfile.TemporaryDirectory(prefix="reconcile_sort_") as scratch:  # local scratch of the sort
            for record in sorted_rows(self.records.path(self.target.records), self.id_param, scratch):
                yield str(record[self.id_param]), prepare(record) if prepare is not None else record

    def _target(self, rows: Iterable[dict]) -> Iterator[tuple[str, dict]]:
        """(external id, row) in order; _OutOfOrder when the vault's order is not ours."""
        last = None
        for row in rows:
            external_id = str(row[self.id_param])
            if last is not None and external_id < last:
                raise _OutOfOrder(f"{last!r} came before {external_id!r}")
            last = external_id
            self.in_target += 1
            yield external_id, row

    def _progress(self, what: str, total: int | None = None, unit: str = "records") -> Progress:
        return Progress(f"{what} {self.target_object}", total, writer=self.progress, logger=log, unit=unit,
                        burst=lambda: getattr(self.client, "burst_remaining", None))

    def drift(self) -> list[dict]:
        """Both sides in external-id order, merged: each expected record meets its target record."""
        with self._progress("compare", unit="target records read") as progress:
            try:
                return self._merge(target_records(self.client, self.target, self.cfg, self.read, self.prefix,
                                                  progress))
            except _OutOfOrder as error:  # e.g. a collation of the vault's: compare from a sorted copy instead
                log.warning("%s: the target's external-id order differs from ours (%s): reading it again, sorted in "
                            "memory", self.target_object, error)
                rows = sorted(target_records(self.client, self.target, self.cfg, self.read, self.prefix, progress),
                              key=lambda r: str(r[self.id_param]))
                return self._merge(rows)

    def _merge(self, rows: Iterable[dict]) -> list[dict]:
        self.expected, self.in_target, self.resend = 0, 0, {}
        found: list[dict] = []
        unmatched: list[tuple[str, dict]] = []  # target records no expected record met, checked FLUSH at a time
        gone: dict[str, dict] = {}  # {external id: row} whose source record is gone and that lack the mark
        target = self._target(rows)
        current, met = next(target, None), False
        for external_id, record in self._expected():
            self.expected += 1
            while current is not None and current[0] < external_id:
                if not met:
                    unmatched.append(current)
                    if len(unmatched) >= self.FLUSH:
                        self._gone(unmatched, gone)
                current, met = next(target, None), False
            row = current[1] if current is not None and current[0] == external_id else None
            met = met or row is not None
            diff = differences(record, row, self.fields) if row is not None else None
            if row is None or diff:
                self.resend[external_id] = record
                found.append({"kind": "stale" if diff else "missing", "external_id": external_id,
                              "source_id": str(record[SOURCE_ID]), "details": {"fields": diff} if diff else None})
        while current is not None:
            if not met:
                unmatched.append(current)
            current, met = next(target, None), False
        self._gone(unmatched, gone)
        return found + self._lost(gone)

    def _gone(self, unmatched: list[tuple[str, dict]], gone: dict[str, dict]) -> None:
        """Of target records without an expected record, those whose source record is not in the
        read (valid or not, in scope or not) and that lack the mark go to `gone`."""
        if unmatched:
            there = self.sources.isin([e for e, _ in unmatched])
            for (external_id, row), exists in zip(unmatched, there):
                if not exists and not any(carries_mark(m, row, self.entries.get(external_id)) for m in self.marks):
                    gone[external_id] = row
            unmatched.clear()

    def _lost(self, gone: dict[str, dict]) -> list[dict]:
        """Target records whose source record is gone: a missing mark when the connection knows the
        record (deletion queue, deletions since the start date, id map), else extra when it was
        modified since the start date (older: history, out of scope)."""
        existing = self.still_there(list(gone)) if gone else set()
        lost = [e for e in gone if e not in existing]
        written = self.ledger.known_external_ids(self.cfg.name, self.target_object, lost) if lost else set()
        found: list[dict] = []
        for external_id in lost:
            row = gone[external_id]
            known = external_id in self.entries or external_id in self.deleted or external_id in written
            if not known and not changed_since(pd.DataFrame([{MODIFIED_DATE: row.get(MODIFIED_DATE)}]),
                                               self.start).iloc[0]:
                continue
            mark = self.marks[0] if known and self.marks else None
            found.append({"kind": "missing_deletion_mark" if mark else "extra", "external_id": external_id,
                          "source_id": self.source_id(external_id), "details": mark and {"fields": {
                              k: {"expected": value(v), "actual": value(row.get(k))}
                              for k, v in mark.change(row).items()}}})
        return found

    def still_there(self, global_ids: list[str]) -> set[str]:
        """Which of these source records exist after all: changed since the full read, or no
        longer selected by the flow (e.g. a call whose flag was cleared) — neither is a deletion,
        and the connection leaves their target records alone."""
        query = Query.select(self.source_object, [GLOBAL_ID]).paged(self.cfg.load.query_page_size)
        return {str(r[GLOBAL_ID]) for chunk in query.contains(GLOBAL_ID, global_ids)
                for page in self.source_client.query(chunk) for r in page.records}

    def repair(self, found: list[dict]) -> list[str]:
        """Re-send what drifted (extra excepted); the external ids repaired."""
        resent = [self.resend[d["external_id"]] for d in found if d["kind"] in RESENT]
        unmarked = [d for d in found if d["kind"] == "missing_deletion_mark"]
        with self._progress("repair", len(resent) + len(unmarked)) as progress:
            repaired = self._resend(resent, progress)
            if unmarked:
                repaired += self._mark(self.marks[0], unmarked)
                progress.advance(len(unmarked))
        return repaired

    RESEND_BATCHES = 20  # write batches re-sent per progress step (the same batches as one upsert of all)

    def _resend(self, records: list[dict], progress: Progress | None = None) -> list[str]:
        if not records:
            return []
        guard = load.VersionGuard(self.ledger, self.cfg.name, self.flow.name, self.source_object)
        step = min(self.cfg.load.batch_size, MAX_BATCH) * self.RESEND_BATCHES
        loaded: list[dict] = []
        with self.ledger.exclusive(load.lock_name(self.cfg.name, self.target_object)):
            for start in range(0, len(records), step):
                outcomes = load.upsert(self.client, self.target_object, records[start:start + step], self.id_param,
                                       self.cfg.load.batch_size, guard=guard)
                loaded += load.record_written(self.ledger.id_map(self.cfg.name, self.target_object), outcomes)
                load.log_failures(self.target_object, [o for o in outcomes if o["outcome"] not in load.LOADED],
                                  "repair")
                if progress is not None:
                    progress.advance(len(outcomes))
        return [o["external_id"] for o in loaded]

    def _mark(self, mark: DeletionMark, unmarked: list[dict]) -> list[str]:
        """Apply the mark as a run would, through the ledger's deletion queue (so it is applied once)."""
        name, direction, obj = self.cfg.name, self.flow.name, self.source_object
        self.ledger.queue_deletions(name, direction, obj, [(d["source_id"], d["external_id"]) for d in unmarked])
        pending = [{"source_id": d["source_id"], "global_id": d["external_id"],
                    "expected": (self.entries.get(d["external_id"]) or {}).get("expected")} for d in unmarked]
        outcomes, no_target = load.mark_deleted(
            self.client, mark, pending, self.cfg.load.batch_size,
            expect=lambda changes: self.ledger.expect_deletions(name, direction, obj, changes))
        self.ledger.settle_deletions(name, direction, obj, outcomes, no_target)
        load.log_failures(self.target_object, [o for o in outcomes if o["outcome"] == "failed"], "repair")
        by_source = {d["source_id"]: d["external_id"] for d in unmarked}
        return [by_source[o["source_id"]] for o in outcomes if o["outcome"] in ("marked_deleted", "unchanged")]


# ---------------------------------------------------------------- one flow


def reconcile(flow: Flow, cfg, clients: dict, dag_run_id: str, repair: bool = False, ledger: Ledger | None = None,
              now: datetime | None = None) -> dict:
    """Reconcile every enabled target of one flow of one connection. Returns the run's summary:
    {"run_id", "repair", "objects": {target object: {expected, in_target, <kind>: n, repaired}}}."""
    ledger = ledger or Ledger()
    run_id = ledger.start_reconcile(cfg.name, flow.name, dag_run_id, repair)
    end = now or datetime.now(timezone.utc)
    start = max(cfg.schedule.start_date, EVER)
    ctx = RunContext(cfg.name, flow.name, dag_run_id, EVER.isoformat(), end.isoformat(),
                     True, staging.run_dir(cfg.name, f"reconcile_{flow.name}", dag_run_id), run_id)
    objects: dict[str, dict] = {}
    progress = for_reconcile_run(ledger, run_id)  # each long step's latest figures, in the run's row
    try:
        staged = _read(flow, cfg, clients, ledger, ctx, Window(start, end), progress)
        scoped = in_scope(flow, cfg, ledger, staged, ctx.run_dir, start)
        release_memory()  # what the reads' threads and the scope's passes left, before GX
        valid = _valid_rows(flow, cfg, scoped, ctx.run_dir, progress)
        records = runner.transform(flow, cfg, ctx, scoped, valid)
        release_memory()
        for target in flow.targets:
            check = TargetCheck(flow, target, cfg, clients, ledger, staged, records, start, progress)
            objects[check.target_object] = _reconcile_target(check, ledger, run_id, repair)
            del check
            release_memory()
    except BaseException as error:
        ledger.finish_reconcile(run_id, "failed", {"objects": objects}, f"{type(error).__name__}: {error}")
        raise
    finally:
        staging.remove_run(ctx.run_dir)
    summary = {"run_id": run_id, "repair": repair, "objects": objects}
    ledger.finish_reconcile(run_id, "success", summary)
    return summary


def _read(flow: Flow, cfg, clients: dict, ledger: Ledger, ctx: RunContext, since_start: Window,
          progress: Writer | None = None) -> Staged:
    """The flow's reads over the whole history; its deletions since the start date (a record
    deleted before it is not the connection's). Deleted reads need nothing and feed nothing, so
    they run on their own after the others. Each read logs its progress (`extract <read>`), and
    `progress` keeps it (the reconciliation's ledger row)."""
    reads = [r for r in flow.reads if not isinstance(r, Deleted)]
    deletions = [r for r in flow.reads if isinstance(r, Deleted)]
    known = lambda obj, ids: ledger.known_external_ids(cfg.name, obj, ids)  # noqa: E731
    with _whole_history_deletions():
        files = Reading(reads, clients, ctx.window, ctx.run_dir, cfg.load.concurrency, {}, known=known,
                        page_size=cfg.load.query_page_size, progress=progress).run()
        if deletions:
            files |= Reading(deletions, clients, since_start, ctx.run_dir, cfg.load.concurrency, {}, known=known,
                             page_size=cfg.load.query_page_size, progress=progress).run()
    return Staged(files)


def _reconcile_target(check: TargetCheck, ledger: Ledger, run_id: int, repair: bool) -> dict:
    found = check.drift()
    ledger.add_drift(run_id, check.cfg.name, check.flow.name, check.target_object, found)
    counts = {"expected": check.expected, "in_target": check.in_target, **dict.fromkeys(KINDS, 0)}
    for d in found:
        counts[d["kind"]] += 1
    if repair and found:
        repaired = check.repair(found)
        ledger.drift_repaired(run_id, check.target_object, repaired)
        counts["repaired"] = len(repaired)
    log.log(logging.WARNING if found else logging.INFO, "%s %s -> %s: %d expected, %d in the target; %s%s",
            check.flow.name, check.source_object, check.target_object, counts["expected"], counts["in_target"],
            ", ".join(f"{k} {counts[k]}" for k in KINDS),
            f"; repaired {counts['repaired']}" if "repaired" in counts else "")
    for d in found[:SHOWN]:
        log.info("  %s %s (source %s)%s", d["kind"], d["external_id"], d["source_id"],
                 "".join(f"; {f}: {c['actual']!r} should be {c['expected']!r}"
                         for f, c in ((d["details"] or {}).get("fields") or {}).items()))
    if len(found) > SHOWN:
        log.info("  ... and %d more (ledger: drift of run %s)", len(found) - SHOWN, run_id)
    return counts
