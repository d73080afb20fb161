"""Reading for any flow: query pages as frames, records changed in a window, records read
again by id, and deleted ids with the global id their target records carry.

API calls are kept to the floor: one query per object (pages follow), relationship fields one
level deep instead of extra lookups, and lookups in CONTAINS chunks as large as VQL allows.

Against a vault that takes hundreds of milliseconds a call, time goes to waiting: reads that do
not depend on each other run side by side (`in_parallel`, `frames_side_by_side`, at most
`load.concurrency` calls in flight), and the next page of a query is requested while this one is
staged (`prefetched`). The pages of one query stay in order.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pandas as pd

from clinical_crm.engine import staging
from clinical_crm.engine.windows import Window
from clinical_crm.values import text
from clinical_crm.vault import Query, vql
from clinical_crm.vault.fields import DELETIONS_KEPT_DAYS, GLOBAL_ID, ID, MODIFIED_DATE, global_id

log = logging.getLogger(__name__)

# Vault keeps the ids of deleted records for 30 days (REFERENCE.md: deletions API); the margin
# keeps a request (and its later pages) inside that limit whatever the clocks say
DELETIONS_KEPT = timedelta(days=DELETIONS_KEPT_DAYS)
DELETIONS_MARGIN = timedelta(minutes=10)
DELETED_COLUMNS = [ID, GLOBAL_ID]


def counted(pages: Iterable, progress=None) -> Iterator:
    """Pass the pages of ONE query through, counting them in `progress` (engine.progress): the
    first page's total (responseDetails.total) adds to the work known, each page's records to
    the work done."""
    first = True
    for page in pages:
        if progress is not None:
            if first:
                progress.add_total(getattr(page, "total", None))
            progress.advance(len(page))
        first = False
        yield page


def counted_frames(frames_: Iterable[pd.DataFrame], progress=None) -> Iterator[pd.DataFrame]:
    """Pass frames through, counting their rows as done in `progress` (no total: e.g. a custom read)."""
    for frame in frames_:
        if progress is not None:
            progress.advance(len(frame))
        yield frame


def frames(client, queries: Iterable[Query | str], progress=None) -> Iterator[pd.DataFrame]:
    """Every page of every query, as frames (the next page requested while this one is staged);
    `progress` counts them (engine.progress)."""
    for query in queries:
        pages = prefetched(client.query(query))
        try:
            for page in counted(pages, progress):
                yield staging.page_frame(page)
        finally:
            pages.close()  # stops the reading thread now, not when the generator is collected


def frames_side_by_side(client, queries: Iterable[Query | str], concurrency: int,
                        progress=None) -> Iterator[pd.DataFrame]:
    """Every page of independent queries (e.g. the CONTAINS chunks of one lookup), `concurrency`
    queries at a time, each query's pages in order; the frames in the order of the queries. A
    query's pages are held until its turn, and at most `concurrency` queries are read ahead of
    the one whose pages go out (lookups: small queries), so memory follows the concurrency."""
    queries = list(queries)
    if concurrency <= 1 or len(queries) <= 1:
        yield from frames(client, queries, progress)
        return

    def read(query) -> list[pd.DataFrame]:
        return [staging.page_frame(p) for p in counted(client.query(query), progress)]

    pool = ThreadPoolExecutor(min(concurrency, len(queries)), thread_name_prefix="extract-lookup")
    ahead: deque = deque()
    try:
        for query in queries:
            ahead.append(pool.submit(read, query))
            if len(ahead) > concurrency:
                yield from ahead.popleft().result()
        while ahead:
            yield from ahead.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def in_parallel(concurrency: int, jobs: dict[str, Callable[[], object]]) -> dict[str, object]:
    """Run independent reads side by side, at most `concurrency` at once; returns each job's
    result by name. Every job ends before the first error (in the order of `jobs`) is raised."""
    if concurrency <= 1 or len(jobs) <= 1:
        return {name: job() for name, job in jobs.items()}
    with ThreadPoolExecutor(min(concurrency, len(jobs)), thread_name_prefix="extract") as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


_END = object()


def prefetched(items: Iterable, ahead: int = 1) -> Generator:
    """The items of `items` (e.g. the pages of a query), produced in a thread up to `ahead` items
    before they are used: the next call is in flight while the caller works on this item. Order
    and errors are kept; a caller that stops early stops the thread after its current call."""
    handoff: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                handoff.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # handed to the caller, raised there
            put((_END, error))

    threading.Thread(target=produce, name="extract-prefetch", daemon=True).start()
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()


def changed(window: Window) -> str:
    """The condition of records modified in the window: (start, end]."""
    return f"{MODIFIED_DATE} > {vql.quote(window.start)} AND {MODIFIED_DATE} <= {vql.quote(window.end)}"


def not_changed(window: Window) -> str:
    return f"({MODIFIED_DATE} <= {vql.quote(window.start)} OR {MODIFIED_DATE} > {vql.quote(window.end)})"


def changed_or_by_id(query: Query, window: Window, ids: Iterable[str]) -> list[Query]:
    """Records modified in the window (ordered along the modified-date index: each page goes on
    where the last ended, and ids break ties, so pages never overlap), and those read again by
    id whatever their modification time (quarantined before, written by a pre-step)."""
    return [query.filter(changed(window)).ordered(MODIFIED_DATE), *query.contains(ID, ids)]


def changed_or_referenced(query: Query, window: Window, global_ids: set[str]) -> list[Query]:
    """Records modified in the window OR referenced by global id, in ONE statement when the list
    fits: `(changed) OR global_id CONTAINS (...)`; when it needs more statements, the later ones
    exclude the window, so no record comes twice."""
    if not global_ids:
        return [query.filter(changed(window))]
    bare = query.paged(None)  # room as the statement's text without PAGESIZE
    first_head = len(bare.filter(f"({changed(window)}) OR {GLOBAL_ID} CONTAINS ").statement)
    later_head = len(bare.filter(f"{not_changed(window)} AND {GLOBAL_ID} CONTAINS ").statement)
    room = vql.VQL_MAX_CHARS - max(first_head, later_head) - 100
    queries = []
    for i, chunk in enumerate(vql.chunk_values(sorted(global_ids), room=room)):
        queries.append(query.filter(f"({changed(window)}) OR {GLOBAL_ID} CONTAINS {vql.in_list(chunk)}") if i == 0
                       else query.filter(not_changed(window), f"{GLOBAL_ID} CONTAINS {vql.in_list(chunk)}"))
    return queries


def deleted_global_ids(client, object_name: str, window: Window, now: datetime | None = None,
                       progress=None) -> Iterator[pd.DataFrame]:
    """Deleted record ids in the window, with the global id their target records carry.

    A window reaching back past what Vault keeps (a backfill of old windows, a first run from an
    old start date) is read from the oldest day kept, with a warning naming the part that can no
    longer be read: records deleted then keep their target state."""
    oldest = (now or datetime.now(timezone.utc)) - DELETIONS_KEPT + DELETIONS_MARGIN
    start = min(max(window.start, oldest), window.end)
    if start > window.start:
        log.warning("deletions of %s between %s and %s cannot be read: Vault keeps deleted record ids for "
                    "%d days; records deleted then keep their state in the target (check them by hand)",
                    object_name, window.start.isoformat(), start.isoformat(), DELETIONS_KEPT.days)
    if start >= window.end:
        return  # nothing of this window is still kept: no call (Vault refuses older start dates)
    for page in counted(client.deletions(object_name, start, window.end), progress):
        if not page.records:
            continue
        ids = [str(r[ID]) for r in page.records]
        yield pd.DataFrame({ID: ids, GLOBAL_ID: [global_id(client.vault_id, i) for i in ids]})


def collect(pages: Iterable[pd.DataFrame], into: set[str], *columns: str) -> Iterator[pd.DataFrame]:
    """Pass pages through, adding the non-blank values of `columns` to `into` on the way."""
    for page in pages:
        for column in columns:
            if column in page:
                into.update(v for v in map(text, page[column]) if v)
        yield page


def staged_values(staged_file, column: str) -> list[str]:
    """The non-blank values of one column of a staged file."""
    values: list[str] = []
    for chunk in staging.read_chunks(staged_file.path if staged_file else None):
        values += [v for v in map(text, chunk[column]) if v]
    return values
