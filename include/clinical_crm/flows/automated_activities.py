"""Automated Clinical Activities: Monitoring Events and Study Communication Log records marked
"Activity Update Required" create or update their related Clinical Activity in CTMS.

The pre-step of ctms_to_crm: it runs before extraction, so the activity goes to CRM in the same
run (extraction reads the ids written here). Idempotent: the activity is upserted by an external id derived from the source
record's global id, and the flag is cleared only once the activity is written. A source
record without a Person cannot have a Clinical Activity (Person is required): it is reported
(ledger outcome `needs_person` + a log warning) and left flagged for a later run.

The flow says what to write (`plan`); the engine writes it through the load path (version
guard, load lock, one ledger outcome per record), then clears the flags the plan asks for.
"""
from __future__ import annotations

import logging

from clinical_crm.config import ConnectionConfig
from clinical_crm.flows.base import SOURCE_ID, SOURCE_OBJECT, Note, PreStep, Writes
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


def source_query(cfg: ConnectionConfig, source: str) -> Query:
    obj = getattr(cfg.ctms, source)
    f = obj.fields
    fields = [ID, GLOBAL_ID, NAME, f.person, f.date, channel_field(f), f.complete, f.study, f.site,
              getattr(f, "study_country", None), getattr(f, "subject", None)]
    return Query.select(obj.object, fields).filter(f"{f.update_required} = {vql.quote(True)}")


def clinical_activity(row: dict, cfg: ConnectionConfig, source: str) -> dict:
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


def plan(cfg: ConnectionConfig, ctms) -> Writes:
    """The Clinical Activities of flagged records (one upsert for both sources: fewer calls),
    and, once written, the flags to clear (one update per source)."""
    a = cfg.ctms.activity.fields
    records: list[dict] = []
    notes: list[Note] = []
    counted: dict[str, int] = {}
    for source in SOURCES:
        obj = getattr(cfg.ctms, source)
        flagged = [r for page in ctms.query(source_query(cfg, source)) for r in page.records]
        counted[obj.object] = len(flagged)
        for row in flagged:
            if blank(row.get(obj.fields.person)):
                log.warning("%s %s (%s) has Activity Update Required but no Person: no Clinical Activity "
                            "can be created; left flagged", obj.object, row[ID], text(row.get(NAME)))
                notes.append(Note(obj.object, str(row[ID]), "needs_person",
                                  "Activity Update Required but no Person; left flagged"))
                continue
            records.append(clinical_activity(row, cfg, source) | {SOURCE_ID: row[ID], SOURCE_OBJECT: obj.object})

    def clear_flags(written: dict[str, list[str]]) -> dict[str, list[dict]]:
        fields = {getattr(cfg.ctms, s).object: getattr(cfg.ctms, s).fields for s in SOURCES}
        return {obj: [{ID: source_id, fields[obj].update_required: False} for source_id in ids]
                for obj, ids in written.items()}

    return Writes(cfg.ctms.activity.object, a.external_id, records, then=clear_flags, notes=notes, counted=counted)


def pre_step(cfg: ConnectionConfig) -> PreStep:
    return PreStep("automate_activities", plan=lambda ctms: plan(cfg, ctms),
                   source_objects=tuple(getattr(cfg.ctms, s).object for s in SOURCES),
                   object=cfg.ctms.activity.object)
