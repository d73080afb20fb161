"""Load: batched upserts by external id, deletion markers, one outcome per record.

Idempotent: every write is an upsert by the source's global id (`idParam`), and the deletion
markers are applied only to records that do not carry them yet, so a retried task or a re-run
window gives the same end state.

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
from datetime import datetime

import pandas as pd

from clinical_crm import staging, vql, windows
from clinical_crm.extract import contains_queries, query_pages, select
from clinical_crm.transform import (
    ID,
    OBJECT_TYPE_API_NAME,
    SOURCE_ID,
    SOURCE_VERSION,
    STATUS,
    deleted_status,
    deleted_subject,
    inactivated,
    is_deleted_subject,
    text,
)

log = logging.getLogger(__name__)

LOADED = ("created", "updated", "unchanged")


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
        return windows.parse_time(value)
    except (TypeError, ValueError):
        return None


def vault_time(moment: datetime) -> str:
    """A version as Vault writes datetimes: 2026-11-25T10:00:00.000Z."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class VersionGuard:
    """The version check of one source object of one connection and direction, on the ledger.

    `superseded(versions)` answers, for {source id: version}, the records whose version is OLDER
    than one already written ({source id: newer version}); `record(versions)` remembers versions
    just written (the newest per record is kept)."""

    def __init__(self, ledger, connection: str, direction: str, source_object: str, run_id: int | None = None):
        self.ledger, self.connection, self.direction = ledger, connection, direction
        self.source_object, self.run_id = source_object, run_id

    def superseded(self, versions: dict[str, datetime]) -> dict[str, datetime]:
        if not versions:
            return {}
        loaded = self.ledger.loaded_versions(self.connection, self.direction, self.source_object, versions)
        return {s: loaded[s] for s, v in versions.items() if s in loaded and loaded[s] > v}

    def record(self, versions: dict[str, datetime]) -> None:
        if versions:
            self.ledger.record_versions(self.connection, self.direction, self.source_object, versions, self.run_id)


def upsert(client, object_name: str, records: Iterable[dict], id_param: str, batch_size: int,
           source_ids: dict[str, str] | None = None, guard: VersionGuard | None = None) -> list[dict]:
    """Upsert records by `id_param` in batches; one outcome dict per record. The outcome's source_id
    is the record's SOURCE_ID (never sent), else `source_ids[external id]`, else the external id.
    Duplicates in one batch would fail the batch: the last one wins.

    With a `guard`, each batch is checked right before its call: a record whose SOURCE_VERSION
    (never sent) is older than the version already written for its source id is not sent (outcome
    `superseded`); right after the call the versions of the records written are recorded."""
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
    for batch in _batches(ordered, min(batch_size, 500)):
        if guard is not None:
            mine = {source_ids.get(str(r[id_param]), str(r[id_param])): versions[str(r[id_param])] for r in batch
                    if versions.get(str(r[id_param])) is not None}
            newer = guard.superseded(mine)
            if newer:
                kept = []
                for r in batch:
                    external = str(r[id_param])
                    source = source_ids.get(external, external)
                    if source in newer:
                        outcomes.append({
                            "source_id": source, "target_id": None, "outcome": "superseded", "error_type": None,
                            "external_id": external,
                            "message": f"a newer version (modified {vault_time(newer[source])}) was already sent; "
                                       f"this run's older version (modified {vault_time(mine[source])}) was not written"})
                    else:
                        kept.append(r)
                skipped += len(batch) - len(kept)
                batch = kept
        if not batch:
            continue
        results = client.upsert(object_name, batch, id_param=id_param, batch_size=min(batch_size, 500))
        written: dict[str, datetime] = {}
        for record, result in zip(batch, results):
            external = str(record[id_param])
            source = source_ids.get(external, external)
            outcomes.append(_outcome(result, source) | {"external_id": external})
            if result.outcome in LOADED and versions.get(external) is not None:
                written[source] = versions[external]
        if guard is not None:
            guard.record(written)
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("%s: %d of %d records written (%.0f records/s)", object_name, len(outcomes) - skipped,
                 len(ordered), (len(outcomes) - skipped) / elapsed)
    if skipped:
        log.warning("%s: %d records not written: a newer version of each was already sent by another run "
                    "(outcome superseded)", object_name, skipped)
    return outcomes


def update(client, object_name: str, records: list[dict], batch_size: int) -> list[dict]:
    """Update records by id in batches; one outcome dict per record (source_id = target id)."""
    outcomes = []
    for batch in _batches(records, min(batch_size, 500)):
        results = client.update(object_name, batch, batch_size=min(batch_size, 500))
        outcomes += [_outcome(r, str(rec[ID])) for rec, r in zip(batch, results)]
    return outcomes


def tally(outcomes: Iterable[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    counts["loaded"] = sum(counts.get(k, 0) for k in LOADED)
    return counts


def find_by_external_id(client, object_name: str, external_field: str, external_ids: Iterable[str],
                        fields: list[str], where: str = "") -> pd.DataFrame:
    """Target records carrying these external ids (CONTAINS chunks): one query per chunk."""
    statement = f"SELECT {select([ID, external_field, *fields])} FROM {object_name}"
    if where:
        statement += f" WHERE {where}"
    pages = list(query_pages(client, contains_queries(statement, external_field, external_ids)))
    pages = [p for p in pages if not p.empty]
    if not pages:
        return pd.DataFrame(columns=[ID, external_field, *fields])
    return pd.concat(pages, ignore_index=True)


# ---------------------------------------------------------------- deletions


def mark_deleted_interactions(cfg, crm, deleted_global_ids: list[str]) -> list[dict]:
    """A deleted Clinical Activity: its CRM interaction's subject gets the suffix, exactly once."""
    i = cfg.crm.interaction
    found = find_by_external_id(crm, i.object, i.fields.external_id, deleted_global_ids, [i.fields.subject])
    outcomes, changes = [], []
    for row in found.to_dict("records"):
        source = str(row[i.fields.external_id])
        if is_deleted_subject(row.get(i.fields.subject), cfg):
            outcomes.append({"source_id": source, "target_id": row[ID], "outcome": "unchanged",
                             "message": "subject already marked deleted"})
        else:
            changes.append(({ID: row[ID], i.fields.subject: deleted_subject(row.get(i.fields.subject), cfg)}, source))
    for result, (record, source) in zip(update(crm, i.object, [c for c, _ in changes], cfg.load.batch_size), changes):
        outcomes.append(result | {"source_id": source, "outcome": _deleted(result["outcome"])})
    return outcomes


def mark_deleted_status(cfg, crm, entity: str, deleted_global_ids: list[str]) -> list[dict]:
    """A deleted Study / Study Site: "Deleted in Vault Clinical" on the CRM record if one exists
    (update when found, never create)."""
    target = getattr(cfg.crm, entity)
    status_field = cfg.deletion.crm_status_field
    found = find_by_external_id(crm, target.object, target.fields.external_id, deleted_global_ids, [status_field])
    outcomes, changes = [], []
    for row in found.to_dict("records"):
        source = str(row[target.fields.external_id])
        if text(row.get(status_field)) == cfg.deletion.crm_deleted_status:
            outcomes.append({"source_id": source, "target_id": row[ID], "outcome": "unchanged",
                             "message": "already marked deleted"})
        else:
            changes.append((deleted_status([row[ID]], cfg)[0], source))
    for result, (record, source) in zip(update(crm, target.object, [c for c, _ in changes], cfg.load.batch_size), changes):
        outcomes.append(result | {"source_id": source, "outcome": _deleted(result["outcome"])})
    return outcomes


def inactivate_medical_activities(cfg, ctms, deleted_call_global_ids: list[str]) -> list[dict]:
    """A deleted CRM call: its Medical Activity is inactivated (status), once."""
    a = cfg.ctms.activity
    where = f"{OBJECT_TYPE_API_NAME} = {vql.quote(a.medical_type)}"  # never touch Clinical Activities
    found = find_by_external_id(ctms, a.object, a.fields.external_id, deleted_call_global_ids, [STATUS], where)
    outcomes, changes = [], []
    for row in found.to_dict("records"):
        source = str(row[a.fields.external_id])
        if text(row.get(STATUS)) == cfg.deletion.ctms_inactive_status:
            outcomes.append({"source_id": source, "target_id": row[ID], "outcome": "unchanged",
                             "message": "already inactive"})
        else:
            changes.append((inactivated([row[ID]], cfg)[0], source))
    for result, (record, source) in zip(update(ctms, a.object, [c for c, _ in changes], cfg.load.batch_size), changes):
        outcomes.append(result | {"source_id": source, "outcome": _deleted(result["outcome"])})
    return outcomes


def _deleted(outcome: str) -> str:
    return "marked_deleted" if outcome in ("updated", "created") else outcome


def staged_ids(staged: dict | None, column: str) -> list[str]:
    ids: list[str] = []
    for chunk in staging.read_chunks((staged or {}).get("path")):
        ids += [v for v in map(text, chunk[column]) if v]
    return ids
