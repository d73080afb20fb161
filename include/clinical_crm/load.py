"""Load: batched upserts by external id, deletion markers, one outcome per record.

Idempotent: every write is an upsert by the source's global id (`idParam`), and the deletion
markers are applied only to records that do not carry them yet, so a retried task or a re-run
window gives the same end state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

import pandas as pd

from clinical_crm import staging, vql
from clinical_crm.extract import contains_queries, query_pages, select
from clinical_crm.transform import (
    ID,
    OBJECT_TYPE_API_NAME,
    SOURCE_ID,
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


def upsert(client, object_name: str, records: Iterable[dict], id_param: str, batch_size: int,
           source_ids: dict[str, str] | None = None) -> list[dict]:
    """Upsert records by `id_param` in batches; one outcome dict per record. The outcome's source_id
    is the record's SOURCE_ID (never sent), else `source_ids[external id]`, else the external id.
    Duplicates in one batch would fail the batch: the last one wins."""
    source_ids = dict(source_ids or {})
    unique = {}
    for r in records:
        r = dict(r)
        source = r.pop(SOURCE_ID, None)
        if source is not None:
            source_ids[str(r[id_param])] = str(source)
        unique[str(r[id_param])] = _clean(r)
    ordered = list(unique.values())
    outcomes: list[dict] = []
    started = time.monotonic()
    for batch in _batches(ordered, min(batch_size, 500)):
        results = client.upsert(object_name, batch, id_param=id_param, batch_size=min(batch_size, 500))
        for record, result in zip(batch, results):
            external = str(record[id_param])
            outcomes.append(_outcome(result, (source_ids or {}).get(external, external)) | {"external_id": external})
        elapsed = max(time.monotonic() - started, 1e-6)
        log.info("%s: %d of %d records written (%.0f records/s)", object_name, len(outcomes), len(ordered),
                 len(outcomes) / elapsed)
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
