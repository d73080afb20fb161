"""Automated Clinical Activities: Monitoring Events and Study Communication Log records marked
"Activity Update Required" create or update their related Clinical Activity in CTMS.

The pre-step of ctms_to_crm: it runs before extraction, so the activity goes to CRM in the same
run (extraction reads the ids written here). Idempotent: the activity is upserted by an external id derived from the source
record's global id, and the flag is cleared only once the activity is written. A source
record without a Person cannot have a Clinical Activity (Person is required): it is reported
(ledger outcome `needs_person` + a log warning) and left flagged for a later run.
"""
from __future__ import annotations

import logging

from clinical_crm.rules import automated_external_id
from clinical_crm.values import blank, is_yes, text
from clinical_crm.vault import Query, vql
from clinical_crm.vault.fields import GLOBAL_ID, ID, NAME, OBJECT_TYPE_API_NAME

log = logging.getLogger(__name__)

SOURCES = ("monitoring_event", "communication_log")


def channel_field(fields) -> str:
    """Where a source record says how the interaction happened: a Monitoring Event's Monitoring
    Visit Method, a Communication Log's Channel; copied to the activity's Channel."""
    return getattr(fields, "visit_method", None) or fields.channel


def source_query(cfg, source: str) -> Query:
    obj = getattr(cfg.ctms, source)
    f = obj.fields
    fields = [ID, GLOBAL_ID, NAME, f.person, f.date, channel_field(f), f.complete, f.study, f.site,
              getattr(f, "study_country", None), getattr(f, "subject", None)]
    return Query.select(obj.object, fields).filter(f"{f.update_required} = {vql.quote(True)}")


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
        a.channel: text(row.get(channel_field(f))),
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


def run(cfg, ctms, ledger=None, context=None) -> tuple[list[str], dict[str, dict]]:
    """Create/update the Clinical Activities of flagged records, then clear the flags.

    One upsert for the activities of both sources (fewer calls), then one flag update per source.
    Returns the ids of the activities written and counts per source object.
    """
    from clinical_crm.engine import load
    from clinical_crm.flows.base import SOURCE_ID

    a = cfg.ctms.activity.fields
    flagged: dict[str, list[dict]] = {}
    activities: list[dict] = []
    source_of: dict[str, str] = {}  # activity external id -> source name
    for source in SOURCES:
        obj = getattr(cfg.ctms, source)
        flagged[source] = [r for page in ctms.query(source_query(cfg, source)) for r in page.records]
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
        if ledger is not None and context is not None:
            ledger.add_outcomes(context.run_id, context.connection, context.direction, obj.object, report)
        counts[obj.object] = load.tally(mine) | {"flagged": len(flagged[source]), "needs_person": len(without_person)}
        log.info("automated activities from %s: %s", obj.object, counts[obj.object])
    return activity_ids, counts
