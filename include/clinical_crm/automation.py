"""Automated Clinical Activities: Monitoring Events and Study Communication Log records marked
"Activity Update Required" create or update their related Clinical Activity in CTMS.

Runs before extraction, so the activity goes to CRM in the same run (extraction reads the ids
written here). Idempotent: the activity is upserted by an external id derived from the source
record's global id, and the flag is cleared only once the activity is written. A source
record without a Person cannot have a Clinical Activity (Person is required): it is reported
(ledger outcome `needs_person` + a log warning) and left flagged for a later run.
"""
from __future__ import annotations

import logging

import pandas as pd

from clinical_crm import load, vql
from clinical_crm.extract import query_pages, select
from clinical_crm.transform import (
    GLOBAL_ID,
    ID,
    NAME,
    OBJECT_TYPE_API_NAME,
    SOURCE_ID,
    automated_external_id,
    blank,
    is_yes,
    text,
)

log = logging.getLogger(__name__)

SOURCES = ("monitoring_event", "communication_log")


def source_query(cfg, source: str) -> str:
    obj = getattr(cfg.ctms, source)
    f = obj.fields
    fields = [ID, GLOBAL_ID, NAME, f.person, f.date, f.channel, f.complete, f.study, f.site,
              getattr(f, "study_country", None), getattr(f, "subject", None)]
    return f"SELECT {select(fields)} FROM {obj.object} WHERE {f.update_required} = {vql.quote(True)}"


def clinical_activity(row: dict, cfg, source: str) -> dict:
    """The Clinical Activity of one Monitoring Event / Communication Log record (with its link back)."""
    f = getattr(cfg.ctms, source).fields
    a = cfg.ctms.activity.fields
    link_field = a.monitoring_event if source == "monitoring_event" else a.communication_log
    subject_field = getattr(f, "subject", None)
    subject = text(row.get(subject_field)) if subject_field else None
    record = {
        a.external_id: automated_external_id(row[GLOBAL_ID]),
        OBJECT_TYPE_API_NAME: cfg.ctms.activity.clinical_type,
        a.person: text(row.get(f.person)),
        a.date: text(row.get(f.date)),
        a.channel: text(row.get(f.channel)),
        a.complete: is_yes(row.get(f.complete)),
        a.subject: subject or text(row.get(NAME)),
        a.study: text(row.get(f.study)),
        a.site: text(row.get(f.site)),
        link_field: row[ID],
    }
    study_country = getattr(f, "study_country", None)
    if study_country:
        record[a.study_country] = text(row.get(study_country))
    return record


def automate_activities(cfg, ctms, ledger=None, run: dict | None = None) -> dict:
    """Create/update the Clinical Activities of flagged records, then clear the flags.

    One upsert for the activities of both sources (fewer calls), then one flag update per source.
    Returns {"activity_ids": [...], "counts": {source object: {...}}}.
    """
    a = cfg.ctms.activity.fields
    flagged: dict[str, list[dict]] = {}
    activities: list[dict] = []
    source_of: dict[str, str] = {}  # activity external id -> source name
    for source in SOURCES:
        obj = getattr(cfg.ctms, source)
        frames = [p for p in query_pages(ctms, [source_query(cfg, source)]) if not p.empty]
        flagged[source] = pd.concat(frames, ignore_index=True).to_dict("records") if frames else []
        for row in flagged[source]:
            if blank(row.get(obj.fields.person)):
                log.warning("%s %s (%s) has Activity Update Required but no Person: no Clinical Activity "
                            "can be created; left flagged", obj.object, row[ID], text(row.get(NAME)))
                continue
            activity = clinical_activity(row, cfg, source)
            activities.append(activity | {SOURCE_ID: row[ID]})
            source_of[activity[a.external_id]] = source
    outcomes = load.upsert(ctms, cfg.ctms.activity.object, activities, a.external_id, cfg.load.batch_size)

    activity_ids: list[str] = []
    counts: dict[str, dict] = {}
    for source in SOURCES:
        obj = getattr(cfg.ctms, source)
        mine = [o for o in outcomes if source_of.get(o["external_id"]) == source]
        written = [o for o in mine if o["outcome"] in load.LOADED]
        activity_ids += [o["target_id"] for o in written if o["target_id"]]
        cleared = load.update(ctms, obj.object,
                              [{ID: o["source_id"], obj.fields.update_required: False} for o in written],
                              cfg.load.batch_size)
        without_person = [r for r in flagged[source] if blank(r.get(obj.fields.person))]
        report = [o | {"message": o.get("message") or f"Clinical Activity {o['target_id']} {o['outcome']}"}
                  for o in mine]
        report += [{"source_id": str(r[ID]), "outcome": "needs_person",
                    "message": "Activity Update Required but no Person; left flagged"} for r in without_person]
        report += [c | {"message": f"flag not cleared: {c.get('message')}"} for c in cleared if c["outcome"] == "failed"]
        if ledger is not None and run is not None:
            ledger.add_outcomes(run["run_id"], run["connection"], run["direction"], obj.object, report)
        counts[obj.object] = load.tally(mine) | {"flagged": len(flagged[source]), "needs_person": len(without_person)}
        log.info("automated activities from %s: %s", obj.object, counts[obj.object])
    return {"activity_ids": activity_ids, "counts": counts}
