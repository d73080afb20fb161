"""The field rules of the connection, as Veeva describes them: one pure function per rule.

Every API name and picklist value comes from the connection configuration `cfg`. The flows
(clinical_crm.flows) call these to build target records; a reader who knows the feature finds
each rule of the seed text here, once.
"""
from __future__ import annotations

from typing import Any

from clinical_crm.values import blank, is_yes, text
from clinical_crm.vault.fields import CREATED_BY

# Activity levels, most specific first: "Activities against a Study, Study Site, Study
# Country, or Study Person" -- the interaction's context says which one it was logged on.
CONTEXT_LEVELS = ("study_person", "site", "study_country", "study")


def crm_channel(ctms_value: Any, cfg) -> str | None:
    """CTMS Channel -> CRM Call Channel (picklists match 1:1). None when missing or unmapped."""
    value = text(ctms_value)
    return None if value is None else cfg.channel_map.get(value)


def ctms_channel(crm_value: Any, cfg) -> str | None:
    """CRM Call Channel -> CTMS Channel (the channel map inverted)."""
    value = text(crm_value)
    return None if value is None else cfg.inbound_channel_map.get(value)


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


def creator_columns(user_fields) -> list[str]:
    """The creating user's name and email, as relationship columns of the source record."""
    return [f"{CREATED_BY}.{user_fields.first_name}", f"{CREATED_BY}.{user_fields.last_name}",
            f"{CREATED_BY}.{user_fields.email}"]


def creator_label(row: dict, user_fields) -> str | None:
    """"From" for a staged source row: `from_label` of the creating user's relationship fields."""
    return from_label(*(row.get(column) for column in creator_columns(user_fields)))


def deleted_subject(subject: Any, cfg) -> str:
    """The subject with the deletion suffix appended ("Visit" -> "Visit Deleted"). Applied once
    per deletion: the connection's ledger, not the subject's text, says whether it was."""
    suffix = cfg.deletion.subject_suffix
    current = text(subject) or ""
    return f"{current} {suffix}" if current else suffix


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
