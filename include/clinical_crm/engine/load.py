"""Load for any flow: batched upserts by external id, deletion marks, one outcome per record.

Idempotent: every write is an upsert by the source's global id (`idParam`), and a deletion mark
is applied once per deleted record (the ledger's deletion queue says which were), so a retried
task or a re-run window gives the same end state.

No lost updates: each target record carries its source version (`modified_date__v`) from
transform. Right before each write call, records whose version is older than one a load
already wrote (ledger `source_versions`, e.g. a scheduled run that sent a change while a slow
backfill was still holding the older extraction) are dropped with the outcome `superseded`;
right after the call, the versions written are recorded (the newest per record is kept). Equal
versions are written again (idempotent), so a retried task or a re-run window still works.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from clinical_crm.flows.base import SOURCE_ID, SOURCE_VERSION, DeletionMark
from clinical_crm.outcomes import LOADED, RecordResult
from clinical_crm.times import as_utc
from clinical_crm.values import text
from clinical_crm.vault import Query
from clinical_crm.vault.responses import RecordOutcome
from clinical_crm.vault.errors import VaultPartialWrite, VaultTransientError
from clinical_crm.vault.fields import ID, MAX_BATCH, vault_datetime

log = logging.getLogger(__name__)



def _batches(records: list[dict], size: int) -> Iterator[list[dict]]:
    for start in range(0, len(records), size):
        yield records[start:start + size]


def _clean(record: dict) -> dict:
    """Drop unset references (`rel__vr.field: None` cannot be looked up); keep other nulls (they clear)."""
    return {k: v for k, v in record.items() if not ("." in k and v is None)}


def _outcome(o, source_id: str) -> dict:
    return {"source_id": source_id, "target_id": getattr(o, "id", None), "outcome": o.outcome,
            "error_type": getattr(o, "error_type", None), "message": getattr(o, "message", None)}


def parse_version(value) -> datetime | None:
    """A staged source version (`modified_date__v` text) as an aware UTC datetime; None when missing
    or unreadable (then the record is written without a version check, as before versions)."""
    value = text(value) if not isinstance(value, datetime) else value
    if value is None:
        return None
    try:
        return as_utc(value)
    except (TypeError, ValueError):
        return None


class VersionGuard:
    """The version check of one source object of one connection and direction, on the ledger.

    `superseded(versions)` answers, for {source id: version}, the records whose version is OLDER
    than one already written ({source id: newer version}); `record(versions)` remembers versions
    just written (the newest per record is kept)."""

    def __init__(self, ledger, connection: str, direction: str, source_object: str, run_id: int | None = None):
        self.records = ledger.scope(connection, direction, source_object)
        self.run_id = run_id

    def superseded(self, versions: dict[str, datetime]) -> dict[str, datetime]:
        if not versions:
            return {}
        loaded = self.records.loaded_versions(versions)
        return {s: loaded[s] for s, v in versions.items() if s in loaded and loaded[s] > v}

    def record(self, versions: dict[str, datetime]) -> None:
        if versions:
            self.records.record_versions(versions, self.run_id)


def lock_name(connection: str, target_object: str) -> str:
    """The ledger lock every writer of one connection's target object holds (engine.runner's load,
    the reconciliation's repair): two of them never write the same records at once."""
    return f"load.{connection}.{target_object}"


class WriteUncertain(VaultTransientError):
    """A write call failed transiently after every re-send (a timeout, a dropped connection, a
    5xx): the vault may or may not have applied it. `outcomes` holds what this upsert knows,
    including `unknown` for the records of that call, so the ledger says so before the task fails
    (and is retried, or the next run re-sends the newest version)."""

    def __init__(self, cause: VaultTransientError, outcomes: list[dict]):
        super().__init__(cause.error_type, cause.message)
        self.outcomes = outcomes


def upsert(client, object_name: str, records: Iterable[dict], id_param: str, batch_size: int,
           source_ids: dict[str, str] | None = None, guard: VersionGuard | None = None) -> list[dict]:
    """Upsert records by `id_param` in batches; one outcome dict per record. The outcome's source_id
    is the record's SOURCE_ID (never sent), else `source_ids[external id]`, else the external id.
    Duplicates in one batch would fail the batch: the last one wins.

    With a `guard`, each batch is checked right before every send of its call, the first and each
    re-send after a transient fault (a timed-out call may have been applied, and another run may
    have written a newer version meanwhile): a record whose SOURCE_VERSION (never sent) is older
    than the version already written for its source id is not sent (outcome `superseded`); right
    after the call the versions of the records written are recorded. Re-sends follow the client's
    retry policy; when it gives up, WriteUncertain carries the outcomes, `unknown` for that call."""
    source_ids = dict(source_ids or {})
    versions: dict[str, datetime | None] = {}
    unique = {}
    for r in records:
        r = dict(r)
        source = r.pop(SOURCE_ID, None)
        version = r.pop(SOURCE_VERSION, None)
        external = str(r[id_param])
        if source is not None:
            source_ids[external] = str(source)
        versions[external] = parse_version(version)
        unique[external] = _clean(r)
    ordered = list(unique.values())
    outcomes: list[dict] = []
    skipped = 0
    started = time.monotonic()

    def source_of(record: dict) -> str:
        external = str(record[id_param])
        return source_ids.get(external, external)

    def not_superseded(batch: list[dict]) -> list[dict]:
        mine: dict[str, datetime] = {source_of(r): v for r in batch if (v := versions.get(str(r[id_param]))) is not None}
        newer = guard.superseded(mine) if guard is not None else {}
        for r in batch:
            if source_of(r) in newer:
                source = source_of(r)
                outcomes.append({
                    "source_id": source, "target_id": None, "outcome": "superseded", "error_type": None,
                    "external_id": str(r[id_param]),
                    "message": f"a newer version (modified {vault_datetime(newer[source])}) was already sent; "
                               f"this run's older version (modified {vault_datetime(mine[source])}) was not written"})
        return [r for r in batch if source_of(r) not in newer]

    def answered(settled: dict[str, tuple[dict, RecordOutcome]]) -> list[dict]:
        """Outcome dicts of the records the vault answered for; the versions written recorded."""
        answers: list[dict] = []
        written: dict[str, datetime] = {}
        for external, (record, result) in settled.items():
            source = source_of(record)
            answers.append(_outcome(result, source) | {"external_id": external})
            if result.outcome in LOADED and (version := versions.get(external)) is not None:
                written[source] = version
        if guard is not None:
            guard.record(written)
        return answers

    for batch in _batches(ordered, min(batch_size, MAX_BATCH)):
        settled: dict[str, tuple[dict, RecordOutcome]] = {}  # external id -> (record, the vault's outcome)
        try:
            for attempt in client.retrying():
                with attempt:
                    kept = not_superseded(batch)
                    skipped += len(batch) - len(kept)
                    batch = kept
                    if batch:
                        try:
                            results = client.upsert(object_name, batch, id_param=id_param,
                                                    batch_size=min(batch_size, MAX_BATCH), retry=False)
                        except VaultPartialWrite as partial:  # re-send only what is not settled
                            settled.update((str(batch[i][id_param]), (batch[i], o)) for i, o in partial.settled.items())
                            batch = [batch[i] for i in partial.pending]
                            raise
                        settled.update((str(r[id_param]), (r, o)) for r, o in zip(batch, results))
                        batch = []
        except VaultTransientError as exc:
            outcomes += [{"source_id": source_of(r), "target_id": None, "outcome": "unknown", "error_type": exc.error_type,
                          "external_id": str(r[id_param]),
                          "message": f"the write call got no answer ({exc}); the vault may have applied it: "
                                     f"the record is sent again (newest version) by the task's retry or the next run"}
                         for r in batch]
            outcomes += answered(settled)
            raise WriteUncertain(exc, outcomes) from exc
        outcomes += answered(settled)
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("%s: %d of %d records written (%.0f records/s)", object_name, len(outcomes) - skipped,
                 len(ordered), (len(outcomes) - skipped) / elapsed)
    if skipped:
        log.warning("%s: %d records not written: a newer version of each was already sent by another run "
                    "(outcome superseded)", object_name, skipped)
    return outcomes


def update(client, object_name: str, records: list[dict], batch_size: int, concurrency: int = 1) -> list[dict]:
    """Update records by id in batches, `concurrency` calls in flight; one outcome dict per
    record (source_id = target id), in the order of `records`."""
    size = min(batch_size, MAX_BATCH)

    def send(batch: list[dict]) -> list[dict]:
        return [_outcome(r, str(rec[ID])) for rec, r in zip(batch, client.update(object_name, batch, batch_size=size))]

    batches = list(_batches(records, size))
    if concurrency <= 1 or len(batches) <= 1:
        return [o for batch in batches for o in send(batch)]
    pool = ThreadPoolExecutor(min(concurrency, len(batches)), thread_name_prefix="load-update")
    try:
        return [o for answers in pool.map(send, batches) for o in answers]
    finally:
        pool.shutdown(cancel_futures=True)  # after a failed call, the calls not started are not made


SHOWN_FAILURES = 20  # refused records named in the task log per write


def log_failures(object_name: str, outcomes: list[dict], what: str = "write") -> None:
    """Name the first records the vault did not take (the ledger holds every one)."""
    for o in outcomes[:SHOWN_FAILURES]:
        log.warning("%s of %s %s: %s %s %s", what, object_name, o.get("external_id") or o["source_id"], o["outcome"],
                    o.get("error_type") or "", o.get("message") or "")


def compared(value) -> str | None:
    """A field value as compared with what the connection sends: trimmed text, Yes/No as
    true/false, a picklist's first value."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return text(value)


def holds_mark(mark: DeletionMark, row: dict, expected: dict | None) -> bool:
    """Does the target row hold the deletion mark: what `change` gives (a status), or exactly the
    values this connection wrote as the mark before (`expected`, from the deletion queue)?"""
    change = mark.change(row)
    current = {k: compared(row.get(k)) for k in change}
    return (current == {k: compared(v) for k, v in change.items()}
            or bool(expected) and current == {k: compared(v) for k, v in (expected or {}).items()})


def record_written(id_map, outcomes: list[dict]) -> list[dict]:
    """Remember the target record of each outcome written (or found holding the values) in the id
    map (`ledger.id_map(connection, target object)`); returns those outcomes."""
    loaded = [o for o in outcomes if o["outcome"] in LOADED]
    id_map.map_ids([RecordResult.from_dict(o) for o in loaded])
    return loaded


def tally(outcomes: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    counts["loaded"] = sum(counts.get(k, 0) for k in LOADED)
    return counts


def find_by_external_id(client, object_name: str, external_field: str, external_ids: Iterable[str],
                        fields: list[str], where: str = "") -> list[dict]:
    """Target records carrying these external ids (CONTAINS chunks): one query per chunk."""
    query = Query.select(object_name, [ID, external_field, *fields])
    if where:
        query = query.filter(where)
    return [record for chunk in query.contains(external_field, external_ids)
            for page in client.query(chunk) for record in page.records]


# ---------------------------------------------------------------- deletion marks


def mark_deleted(client, mark: DeletionMark, pending: list[dict], batch_size: int, expect=None,
                 concurrency: int = 1) -> tuple[list[dict], set[str]]:
    """Apply a flow's DeletionMark to the target records of deleted source records.

    `pending`: the ledger's queued deletions ({source_id, global_id, expected}). A target record
    already in the marked state (a status), or holding exactly the values this connection wrote
    for it before (`expected`: e.g. a subject with "Deleted" appended once, by a run that ended
    before it could record that), is `unchanged`; the others are updated (outcome
    `marked_deleted`). `expect(source_id -> change)` is called right before the write, so that a
    crash between the write and its record cannot lead to a second mark (so the update calls may
    go `concurrency` at a time: one that fails leaves its records expected, recognised by the
    next run). Returns the outcomes and the source ids whose target record does not exist
    (nothing to mark)."""
    target_object, external_field = mark.target_object, mark.external_id
    by_global_id = {str(p["global_id"]): p for p in pending if p.get("global_id")}
    found = find_by_external_id(client, target_object, external_field, list(by_global_id),
                                mark.read_fields, mark.where or "")
    outcomes, changes = [], []
    seen: set[str] = set()
    for row in found:
        entry = by_global_id.get(str(row[external_field]))
        if entry is None:
            continue
        seen.add(str(row[external_field]))
        change = mark.change(row)
        if holds_mark(mark, row, entry.get("expected")):
            outcomes.append({"source_id": entry["source_id"], "target_id": row[ID], "outcome": "unchanged",
                             "message": mark.already_message})
        else:
            changes.append((entry["source_id"], {ID: row[ID], **change}))
    if changes and expect is not None:
        expect({source: {k: v for k, v in record.items() if k != ID} for source, record in changes})
    written = update(client, target_object, [r for _, r in changes], batch_size, concurrency)
    for (source, _record), result in zip(changes, written):
        outcome = "marked_deleted" if result["outcome"] in ("updated", "created") else result["outcome"]
        outcomes.append(result | {"source_id": source, "outcome": outcome})
    missing = {p["source_id"] for g, p in by_global_id.items() if g not in seen}
    return outcomes, missing
