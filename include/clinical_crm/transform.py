"""The field rules of the connection: one pure function per rule, then frame-level functions.

Every API name comes from the connection configuration `cfg`. Frames handed in come from
staging (every value is text or missing, see staging.py); frames handed out are lists of
Vault records (dicts) ready for an upsert by external id.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from clinical_crm.staging import records as frame_records

# Standard Vault fields (present on every object of every vault, so not configuration).
ID = "id"
GLOBAL_ID = "global_id__sys"
NAME = "name__v"
STATUS = "status__v"
MODIFIED_DATE = "modified_date__v"
OBJECT_TYPE_API_NAME = "object_type__vr.api_name__v"
CREATED_BY = "created_by__vr"
# Carried with each target record from transform to load (never sent): the source record's id,
# so outcomes are recorded against it without holding an id map in memory.
SOURCE_ID = "_source_id"
# Carried the same way (never sent): the source record's modified_date__v as extracted, so the
# load can skip a version older than one another run already wrote (no lost updates).
SOURCE_VERSION = "_source_version"

# Activity levels, most specific first: "Activities against a Study, Study Site, Study
# Country, or Study Person" -- the interaction's context says which one it was logged on.
CONTEXT_LEVELS = ("study_person", "site", "study_country", "study")


# ---------------------------------------------------------------- values


def blank(value: Any) -> bool:
    """Missing in any of the ways a frame can say it (None, NaN, NA, empty text)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text(value: Any) -> str | None:
    """A value as trimmed text, or None when missing."""
    return None if blank(value) else str(value).strip()


def is_yes(value: Any) -> bool:
    """A Vault Yes/No (boolean) field, as staged text or a real bool."""
    if isinstance(value, bool):
        return value
    return (text(value) or "").lower() in ("true", "yes", "1")


def relationship(field: str) -> str:
    """The relationship name of a reference field: study__v -> study__vr, person__clin -> person__clinr."""
    return field + "r"


# ---------------------------------------------------------------- rules


def crm_channel(ctms_value: Any, cfg) -> str | None:
    """CTMS Channel -> CRM Call Channel (picklists match 1:1). None when missing or unmapped."""
    value = text(ctms_value)
    return None if value is None else cfg.channel_map.get(value)


def ctms_channel(crm_value: Any, cfg) -> str | None:
    """CRM Call Channel -> CTMS Channel (the channel map inverted)."""
    value = text(crm_value)
    if value is None:
        return None
    inverse = {crm: ctms for ctms, crm in cfg.channel_map.items()}
    return inverse.get(value)


def crm_status(complete: Any, cfg) -> str:
    """Complete = Yes -> Submitted; anything else (No, missing) -> Planned."""
    return cfg.status.submitted if is_yes(complete) else cfg.status.planned


def ctms_complete(status: Any, cfg) -> bool:
    """Inbound: Status Submitted -> Complete Yes; every other status -> No."""
    return text(status) == cfg.status.submitted


def from_label(first: Any, last: Any, email: Any) -> str | None:
    """"[First Name] [Last Name] ([Email])" of the user who created the record.

    Decision: a user without an email is still worth naming, so the result is just
    "First Last" (no empty parentheses); a user with only an email gives "(email)";
    nobody at all gives None. "From" is optional, so none of these quarantines the record.
    """
    name = " ".join(part for part in (text(first), text(last)) if part)
    mail = text(email)
    if name and mail:
        return f"{name} ({mail})"
    if mail:
        return f"({mail})"
    return name or None


def creator_label(row: dict, user_fields) -> str | None:
    """"From" for a staged source row: `from_label` of the creating user's relationship fields."""
    return from_label(row.get(f"{CREATED_BY}.{user_fields.first_name}"),
                      row.get(f"{CREATED_BY}.{user_fields.last_name}"),
                      row.get(f"{CREATED_BY}.{user_fields.email}"))


def deleted_subject(subject: Any, cfg) -> str:
    """The subject with the deletion suffix appended exactly once ("Visit" -> "Visit Deleted")."""
    suffix = cfg.deletion.subject_suffix
    current = text(subject) or ""
    if is_deleted_subject(current, cfg):
        return current
    return f"{current} {suffix}" if current else suffix


def is_deleted_subject(subject: Any, cfg) -> bool:
    """True when the subject already carries the deletion suffix (so it is never added twice)."""
    current = text(subject) or ""
    suffix = cfg.deletion.subject_suffix
    return current == suffix or current.endswith(" " + suffix)


def activity_context(row: dict, cfg) -> str:
    """Which level a Clinical Activity was logged against: study person, site, country or study."""
    fields = cfg.ctms.activity.fields
    for level in CONTEXT_LEVELS:
        if not blank(row.get(getattr(fields, level))):
            return level
    return "none"


def automated_external_id(source_global_id: str) -> str:
    """The external id of the Clinical Activity created for a Monitoring Event / Communication Log.

    Derived from the source record's global id, so re-running the automation finds the same
    activity (idempotent upsert) instead of creating another one.
    """
    return f"auto_{source_global_id}"


def global_id(vault_id: Any, record_id: Any) -> str:
    """A record's global id (`{vault_id}_{id}`): how deleted ids find their target records."""
    return f"{vault_id}_{record_id}"


# ---------------------------------------------------------------- study information


def study_reference_columns(cfg) -> dict[str, str]:
    """Staged columns holding the unique external ids (global ids) of an activity's study and site."""
    fields = cfg.ctms.activity.fields
    return {
        "study": f"{relationship(fields.study)}.{GLOBAL_ID}",
        "site": f"{relationship(fields.site)}.{GLOBAL_ID}",
    }


def activity_country_column(cfg) -> str:
    """Staged column holding the name of the activity's study country."""
    fields = cfg.ctms.activity.fields
    return f"{relationship(fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def study_information(row: dict, cfg) -> dict[str, Any]:
    """Study / site / country of an activity, as CRM interaction fields.

    References are set through the CRM record's unique external id (the CTMS global id), e.g.
    `clinical_study__vr.external_id__v`, so no CRM id lookup is needed.
    """
    refs = study_reference_columns(cfg)
    crm = cfg.crm
    fields = crm.interaction.fields
    study_ext = f"{crm.clinical_study.fields.external_id}"
    site_ext = f"{crm.clinical_site.fields.external_id}"
    return {
        f"{relationship(fields.study)}.{study_ext}": text(row.get(refs["study"])),
        f"{relationship(fields.site)}.{site_ext}": text(row.get(refs["site"])),
        fields.study_country: text(row.get(activity_country_column(cfg))),
    }


# ---------------------------------------------------------------- frame level: CTMS -> CRM


def _rows(frame: pd.DataFrame) -> Iterable[dict]:
    return frame_records(frame)


def clinical_interactions(activities: pd.DataFrame, cfg) -> list[dict]:
    """Validated Clinical Activities (with their matched `account_id`) -> CRM interactions."""
    a = cfg.ctms.activity.fields
    u = cfg.ctms.user.fields
    i = cfg.crm.interaction.fields
    records = []
    for row in _rows(activities):
        record = {
            SOURCE_ID: row[ID],
            SOURCE_VERSION: text(row.get(MODIFIED_DATE)),
            i.external_id: row[GLOBAL_ID],
            i.account: text(row["account_id"]),
            i.date: text(row.get(a.date)),
            i.channel: crm_channel(row.get(a.channel), cfg),
            i.status: crm_status(row.get(a.complete), cfg),
            i.from_: creator_label(row, u),
            i.subject: text(row.get(a.subject)),
            i.context: activity_context(row, cfg),
        }
        if cfg.features.studies_and_sites:
            record.update(study_information(row, cfg))
        records.append(record)
    return records


def clinical_studies(studies: pd.DataFrame, cfg) -> list[dict]:
    """CTMS Studies -> CRM Clinical Studies (created or updated; marked active)."""
    s = cfg.ctms.study.fields
    c = cfg.crm.clinical_study.fields
    return [
        {
            SOURCE_ID: row[ID],
            SOURCE_VERSION: text(row.get(MODIFIED_DATE)),
            c.external_id: row[GLOBAL_ID],
            NAME: text(row.get(NAME)),
            c.title: text(row.get(s.title)),
            c.phase: text(row.get(s.phase)),
            c.therapeutic_area: text(row.get(s.therapeutic_area)),
            cfg.deletion.crm_status_field: cfg.deletion.crm_active_status,
        }
        for row in _rows(studies)
    ]


def site_study_column(cfg) -> str:
    return f"{relationship(cfg.ctms.site.fields.study)}.{GLOBAL_ID}"


def site_country_column(cfg) -> str:
    return f"{relationship(cfg.ctms.site.fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def clinical_sites(sites: pd.DataFrame, cfg) -> list[dict]:
    """CTMS Study Sites -> CRM Clinical Sites, linked to their Clinical Study by external id."""
    s = cfg.ctms.site.fields
    c = cfg.crm.clinical_site.fields
    study_ext = cfg.crm.clinical_study.fields.external_id
    return [
        {
            SOURCE_ID: row[ID],
            SOURCE_VERSION: text(row.get(MODIFIED_DATE)),
            c.external_id: row[GLOBAL_ID],
            NAME: text(row.get(NAME)),
            f"{relationship(c.study)}.{study_ext}": text(row.get(site_study_column(cfg))),
            c.site_name: text(row.get(s.site_name)),
            c.country: text(row.get(site_country_column(cfg))),
            cfg.deletion.crm_status_field: cfg.deletion.crm_active_status,
        }
        for row in _rows(sites)
    ]


def deleted_status(record_ids: Iterable[str], cfg) -> list[dict]:
    """Updates that mark CRM Clinical Studies / Sites as "Deleted in Vault Clinical"."""
    return [{ID: rid, cfg.deletion.crm_status_field: cfg.deletion.crm_deleted_status} for rid in record_ids]


# ---------------------------------------------------------------- frame level: CRM -> CTMS


def medical_activities(calls: pd.DataFrame, cfg) -> list[dict]:
    """Validated CRM calls (with their matched `person_id`) -> CTMS Medical Activities."""
    c = cfg.crm.call.fields
    u = cfg.crm.user.fields
    a = cfg.ctms.activity.fields
    records = []
    for row in _rows(calls):
        records.append(
            {
                SOURCE_ID: row[ID],
                SOURCE_VERSION: text(row.get(MODIFIED_DATE)),
                a.external_id: row[GLOBAL_ID],
                OBJECT_TYPE_API_NAME: cfg.ctms.activity.medical_type,
                a.person: text(row["person_id"]),
                a.date: text(row.get(c.date)),
                a.channel: ctms_channel(row.get(c.channel), cfg),
                a.complete: ctms_complete(row.get(c.status), cfg),
                a.from_: creator_label(row, u),
                a.subject: text(row.get(c.subject)),
            }
        )
    return records


def inactivated(record_ids: Iterable[str], cfg) -> list[dict]:
    """Updates that inactivate Medical Activities whose CRM call was deleted."""
    return [{ID: rid, STATUS: cfg.deletion.ctms_inactive_status} for rid in record_ids]
