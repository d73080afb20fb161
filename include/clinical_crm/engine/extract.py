"""Reading for any flow: query pages as frames, records changed in a window, records read
again by id, and deleted ids with the global id their target records carry.

API calls are kept to the floor: one query per object (pages follow), relationship fields one
level deep instead of extra lookups, and lookups in CONTAINS chunks as large as VQL allows.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
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


def frames(client, queries: Iterable[Query | str]) -> Iterator[pd.DataFrame]:
    """Every page of every query, as frames."""
    for query in queries:
        for page in client.query(query):
            yield staging.page_frame(page)


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


def deleted_global_ids(client, object_name: str, window: Window, now: datetime | None = None) -> Iterator[pd.DataFrame]:
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
    for page in client.deletions(object_name, start, window.end):
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
