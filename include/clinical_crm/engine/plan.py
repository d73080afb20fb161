"""Runs a flow's declared reads (clinical_crm.flows.base: Windowed, Deleted, Lookup, Referenced,
Custom): in the order their needs give, independent ones side by side.

A read needs the value sets it looks up; the reads that collect them come first. Every read
starts as soon as the reads it needs are done, within `load.concurrency` calls in flight: a
read holds one call slot (its pages follow one another), a lookup as many as it reads chunks
side by side (the concurrency less the reads at its depth beside it). Each read is staged as
`<run_dir>/<name>.parquet`; a Referenced read also stages its `known` ids.
"""
from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from clinical_crm.engine import extract, staging
from clinical_crm.engine.context import StagedFile
from clinical_crm.engine.windows import Window
from clinical_crm.flows.base import Custom, Deleted, Lookup, Read, Referenced, Windowed
from clinical_crm.vault.fields import GLOBAL_ID


def needs(read: Read) -> tuple[str, ...]:
    """The value sets a read looks up."""
    if isinstance(read, Lookup):
        return read.values
    if isinstance(read, Referenced):
        return read.references
    if isinstance(read, Custom):
        return read.needs
    return ()


def dependencies(reads: Iterable[Read]) -> dict[str, set[str]]:
    """{read: the reads that collect what it needs}."""
    reads = list(reads)
    collector = {value: r.name for r in reads for value in getattr(r, "collects", {})}
    return {r.name: {collector[v] for v in needs(r) if v in collector} for r in reads}


def depths(reads: Iterable[Read]) -> dict[str, int]:
    """How many reads deep each read is (0: needs nothing); a cycle is an error of the flow."""
    deps = dependencies(reads)
    depth: dict[str, int] = {}

    def of(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise ValueError(f"reads depend on each other in a cycle: {' -> '.join((*path, name))}")
        if name not in depth:
            depth[name] = 1 + max((of(d, (*path, name)) for d in deps[name]), default=-1)
        return depth[name]

    for name in deps:
        of(name, ())
    return depth


def counts(reads: Iterable[Read], staged: dict[str, StagedFile]) -> dict[str, dict[str, int]]:
    """{source object: {extracted | deleted: rows}} of the counted reads that were staged."""
    found: dict[str, dict[str, int]] = {}
    for r in reads:
        if r.counted and r.object and r.name in staged:
            found.setdefault(r.object, {})[r.counted] = staged[r.name].rows
    return found


class _Slots:
    """Call slots: `load.concurrency` in all, taken and given back by the reads."""

    def __init__(self, total: int):
        self.free, self.total = total, total
        self.changed = threading.Condition()

    def take(self, n: int) -> int:
        n = min(n, self.total)
        with self.changed:
            self.changed.wait_for(lambda: self.free >= n)
            self.free -= n
        return n

    def give(self, n: int) -> None:
        with self.changed:
            self.free += n
            self.changed.notify_all()


class Reading:
    """One run's reads: `run()` stages every read and returns {name: StagedFile}.

    `reread`: ids the Windowed reads read again whatever their modification time
    ({object: ids}); `known(target object, global ids)`: those the target already holds (the
    ledger's id map); `progress`: where each read's progress goes (engine.progress: a writer,
    e.g. `for_run(ledger, run_id)`; every read logs its progress as `extract <name>` either way)."""

    def __init__(self, reads: Iterable[Read], clients: dict, window: Window, run_dir: str, concurrency: int,
                 reread: dict[str, list[str]], known, page_size: int, progress=None):
        self.reads = list(reads)
        self.clients, self.window, self.run_dir = clients, window, run_dir
        self.concurrency = max(1, concurrency)
        self.reread, self.known, self.page_size = reread, known, page_size
        self.progress_writer = progress
        self.values: dict[str, set[str]] = {v: set() for r in self.reads for v in getattr(r, "collects", {})}
        self.staged: dict[str, StagedFile] = {}

    def run(self) -> dict[str, StagedFile]:
        deps, depth = dependencies(self.reads), depths(self.reads)
        beside = {d: sum(1 for v in depth.values() if v == d) for d in depth.values()}
        slots = _Slots(self.concurrency)
        with ThreadPoolExecutor(max(1, len(self.reads)), thread_name_prefix="extract") as pool:
            futures: dict = {}

            def job(read: Read) -> None:
                for name in deps[read.name]:
                    futures[name].result()  # a failed read fails those that need it
                want = max(1, self.concurrency - beside[depth[read.name]] + 1) if isinstance(read, Lookup) else 1
                taken = slots.take(want)
                try:
                    self._stage(read, taken)
                finally:
                    slots.give(taken)

            for read in sorted(self.reads, key=lambda r: depth[r.name]):
                futures[read.name] = pool.submit(job, read)
        for read in self.reads:  # every read has ended: the first error in declared order goes up
            futures[read.name].result()
        return self.staged

    def _file(self, name: str) -> str:
        return f"{self.run_dir}/{name}.parquet"

    def _collected(self, read: Read, pages: Iterable[pd.DataFrame]) -> Iterable[pd.DataFrame]:
        for value, column in getattr(read, "collects", {}).items():
            pages = extract.collect(pages, self.values[value], column)
        return pages

    def _looked_up(self, names: Iterable[str]) -> set[str]:
        return set().union(*(self.values.get(n, set()) for n in names))

    def _stage(self, read: Read, calls: int) -> None:
        from clinical_crm.engine.progress import Progress

        client = self.clients[read.side]
        progress = Progress(f"extract {read.name}", writer=self.progress_writer,
                            burst=lambda: getattr(client, "burst_remaining", None))
        try:
            self._stage_counted(read, calls, client, progress)
        except BaseException:
            progress.finish("failed")
            raise
        progress.finish()

    def _stage_counted(self, read: Read, calls: int, client, progress) -> None:
        if isinstance(read, Windowed):
            reread = self.reread.get(read.object, []) if read.reread else []
            pages = extract.frames(client, extract.changed_or_by_id(read.query, self.window, reread), progress)
            self.staged[read.name] = staging.write_frames(self._file(read.name), self._collected(read, pages),
                                                          read.query.columns)
        elif isinstance(read, Deleted):
            self.staged[read.name] = staging.write_frames(
                self._file(read.name), extract.deleted_global_ids(client, read.object, self.window, progress=progress),
                extract.DELETED_COLUMNS)
        elif isinstance(read, Lookup):
            chunks = read.query.contains(read.field, self._looked_up(read.values), page_aligned=read.page_aligned)
            self.staged[read.name] = staging.write_frames(
                self._file(read.name), extract.frames_side_by_side(client, chunks, calls, progress), read.query.columns)
        elif isinstance(read, Referenced):
            self._stage_referenced(read, client, progress)
        else:
            values = {n: self.values.get(n, set()) for n in read.needs}
            frames = extract.counted_frames(read.read(client, self.window, values), progress)
            self.staged[read.name] = staging.write_frames(
                self._file(read.name), self._collected(read, frames), read.columns)

    def _stage_referenced(self, read: Referenced, client, progress=None) -> None:
        """Changed in the window, plus those referenced that the target does not have yet (never
        sent: e.g. unchanged since before the first run), so every reference resolves."""
        missing = {v for v in self._looked_up(read.references) if v}
        known: set[str] = set()
        if missing:
            known = set(self.known(read.target_object, missing))
            missing -= known
        queries = extract.changed_or_referenced(read.query, self.window, missing)
        pages = extract.collect(extract.frames(client, queries, progress), known, GLOBAL_ID)
        self.staged[read.name] = staging.write_frames(self._file(read.name), self._collected(read, pages))
        self.staged[read.known] = staging.write_frames(
            self._file(read.known), [pd.DataFrame({"external_id": sorted(known)})], ["external_id"])
