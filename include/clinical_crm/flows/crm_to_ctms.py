"""Medical CRM -> CTMS: calls flagged "Send to Vault Clinical" become Medical Activities (upsert
by the call's global id); a deleted call inactivates its Medical Activity.

Reads only flagged calls, never the Vault Clinical Interactions ctms_to_crm writes: no echo.
"""
from __future__ import annotations

from clinical_crm import rules
from clinical_crm.checks import (MAPPING_COMPLETENESS, Rule, add_match, check_frame, channel_rule, column_of, date_rule,
                                 identifier_rule, match_rule, not_null)
from clinical_crm.config import ConnectionConfig
from clinical_crm.flows.base import VALID, Deleted, DeletionMark, Flow, Lookup, Target, Validation, Windowed, target_records
from clinical_crm.values import text
from clinical_crm.vault import Query, vql
from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE, OBJECT_TYPE_API_NAME, STATUS, relationship

# Staged files of a run.
CALLS = "calls"
PERSONS = "persons"
DELETED_CALLS = "deleted_calls"
ACCOUNT_IDENTIFIERS = "account identifiers"  # collected from the calls


def account_identifier_column(cfg: ConnectionConfig) -> str:
    return f"{relationship(cfg.crm.call.fields.account)}.{cfg.identifiers.crm_account_field}"


def call_query(cfg: ConnectionConfig) -> Query:
    """Calls flagged "Send to Vault Clinical", with their Account's identifier and the creating user."""
    c = cfg.crm.call.fields
    fields = [ID, GLOBAL_ID, MODIFIED_DATE, c.account, account_identifier_column(cfg),
              f"{relationship(c.account)}.{ID}", c.date, c.channel,
              c.status, c.subject, *rules.creator_columns(cfg.crm.user.fields)]
    return Query.select(cfg.crm.call.object, fields).filter(f"{c.send_to_clinical} = {vql.quote(True)}")


def person_query(cfg: ConnectionConfig) -> Query:
    return Query.select(cfg.ctms.person.object, [ID, cfg.identifiers.ctms_person_field])


def quality_rules(cfg: ConnectionConfig, today=None) -> list:
    """CRM calls going to CTMS: Account present, with an identifier that matches exactly one
    CTMS Person; channel mapped; a status; a sensible date."""
    ident = cfg.identifiers
    return [
        Rule("account_present", MAPPING_COMPLETENESS, "account", not_null("account"), lambda r: "no Account on the call"),
        identifier_rule("account_has_identifier", "account_identifier", "account", "account_found", "Account", "CRM",
                        ident.crm_account_field),
        channel_rule(list(cfg.channel_map.values())),
        # Status: Submitted -> Complete Yes, any other status (Planned, Saved, ...) -> No; only a
        # missing status is a defect.
        Rule("status_present", MAPPING_COMPLETENESS, "status", not_null("status"), lambda r: "status missing"),
        date_rule(today),
        match_rule("account_person_match", "person_matches", "account_identifier", "CTMS Person",
                   ident.ctms_person_field),
    ]


def call_checks(calls, ref: dict, cfg: ConnectionConfig):
    """The check frame of CRM calls, plus `person_id` for the rows that match."""
    c = cfg.crm.call.fields
    col = column_of(calls)
    checks = check_frame(calls, col(c.channel), col(c.date))
    checks["account"] = col(c.account).map(text)
    checks["account_identifier"] = col(account_identifier_column(cfg)).map(text)
    checks["account_found"] = col(f"{relationship(c.account)}.{ID}").map(text)
    checks["status"] = col(c.status).map(text)
    add_match(checks, "account_identifier", ref["persons"], cfg.identifiers.ctms_person_field,
              "person_matches", "person_id")
    return checks


def medical_activities(calls, cfg: ConnectionConfig) -> list[dict]:
    """Validated CRM calls (with their matched `person_id`) -> CTMS Medical Activities."""
    c, a = cfg.crm.call.fields, cfg.ctms.activity.fields

    def fields(row: dict) -> dict:
        return {OBJECT_TYPE_API_NAME: cfg.ctms.activity.medical_type, a.person: text(row["person_id"]),
                a.date: text(row.get(c.date)), a.channel: rules.ctms_channel(row.get(c.channel), cfg),
                a.complete: rules.ctms_complete(row.get(c.status), cfg),
                a.from_: rules.creator_label(row, cfg.crm.user.fields), a.subject: text(row.get(c.subject))}

    return target_records(calls, a.external_id, fields)


def medical_type(cfg: ConnectionConfig) -> str:
    """Medical Activities only: never Clinical Activities (same object)."""
    return f"{OBJECT_TYPE_API_NAME} = {vql.quote(cfg.ctms.activity.medical_type)}"


def complete_as_boolean(record: dict, cfg: ConnectionConfig) -> dict:
    """Staged as text; Complete is a Yes/No field."""
    field = cfg.ctms.activity.fields.complete
    return record | {field: record.get(field) == "true"}


def build(cfg: ConnectionConfig) -> Flow:
    """The flagged calls of the window (and those read again by id) beside their deletions, then
    the CTMS Persons matching the calls' Account identifiers."""
    page_size = cfg.load.query_page_size
    call, activity = cfg.crm.call, cfg.ctms.activity
    medical = cfg.features.medical_activities
    reads = (Windowed(CALLS, "crm", call.object, call_query(cfg).paged(page_size),
                      collects={ACCOUNT_IDENTIFIERS: account_identifier_column(cfg)}),
             Deleted(DELETED_CALLS, "crm", call.object),
             Lookup(PERSONS, "ctms", person_query(cfg).paged(page_size), cfg.identifiers.ctms_person_field,
                    (ACCOUNT_IDENTIFIERS,)))
    only_medical = medical_type(cfg)
    return Flow(
        name="crm_to_ctms", source_side="crm", target_side="ctms",
        conn_ids={"ctms": cfg.ctms_conn_id, "crm": cfg.crm_conn_id},
        description=("Receives CRM calls flagged *Send to Vault Clinical* as CTMS **Medical Activities**; "
                     "deleted calls inactivate their Medical Activity."),
        reads=reads if medical else (),
        validation=Validation(CALLS, call.object, quality_rules(cfg),
                              lambda calls, ref: call_checks(calls, {"persons": ref[PERSONS]}, cfg), (PERSONS,),
                              matched_column="person_id") if medical else None,
        targets=(Target("medical_activities", VALID, call.object, activity.object, activity.fields.external_id,
                        lambda rows: medical_activities(rows, cfg), holds_quarantine=True,
                        prepare=lambda record: complete_as_boolean(record, cfg), where=only_medical),) if medical else (),
        deletions=(DeletionMark(DELETED_CALLS, call.object, activity.object, activity.fields.external_id,
                                read_fields=[STATUS], where=only_medical,
                                change=lambda row: {STATUS: cfg.deletion.ctms_inactive_status},
                                already_message="already inactive"),) if medical else (),
    )
