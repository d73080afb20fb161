"""Medical CRM -> CTMS: calls flagged "Send to Vault Clinical" become Medical Activities (upsert
by the call's global id); a deleted call inactivates its Medical Activity.

Reads only flagged calls, never the Vault Clinical Interactions ctms_to_crm writes: no echo.
"""
from __future__ import annotations

from clinical_crm import rules
from clinical_crm.checks import (MAPPING_COMPLETENESS, Rule, add_match, check_frame, channel_rule, column_of, date_rule,
                                 identifier_rule, match_rule, not_null)
from clinical_crm.flows.base import VALID, DeletionMark, Extraction, Flow, Target, Validation, target_records
from clinical_crm.values import text
from clinical_crm.vault import Query, vql
from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE, OBJECT_TYPE_API_NAME, STATUS, relationship

# Staged files of a run.
CALLS = "calls"
PERSONS = "persons"
DELETED_CALLS = "deleted_calls"


def account_identifier_column(cfg) -> str:
    return f"{relationship(cfg.crm.call.fields.account)}.{cfg.identifiers.crm_account_field}"


def call_query(cfg) -> Query:
    """Calls flagged "Send to Vault Clinical", with their Account's identifier and the creating user."""
    c = cfg.crm.call.fields
    fields = [ID, GLOBAL_ID, MODIFIED_DATE, c.account, account_identifier_column(cfg),
              f"{relationship(c.account)}.{ID}", c.date, c.channel,
              c.status, c.subject, *rules.creator_columns(cfg.crm.user.fields)]
    return Query.select(cfg.crm.call.object, fields).filter(f"{c.send_to_clinical} = {vql.quote(True)}")


def person_query(cfg) -> Query:
    return Query.select(cfg.ctms.person.object, [ID, cfg.identifiers.ctms_person_field])


def stage(cfg, clients: dict, window, run_dir: str, reread_ids, ledger) -> dict:
    """The flagged calls of the window (and those read again by id) beside their deletions, then
    the CTMS Persons matching the calls' Account identifiers (`load.concurrency` calls at most)."""
    from clinical_crm.engine import extract, staging

    ctms, crm = clients["ctms"], clients["crm"]
    page_size = cfg.load.query_page_size
    identifiers: set[str] = set()

    def stage_calls():
        calls = call_query(cfg).paged(page_size)
        queries = extract.changed_or_by_id(calls, window, reread_ids) if cfg.features.medical_activities else []
        return staging.write_frames(
            f"{run_dir}/{CALLS}.parquet",
            extract.collect(extract.frames(crm, queries), identifiers, account_identifier_column(cfg)), calls.columns)

    def stage_deleted():
        return staging.write_frames(
            f"{run_dir}/{DELETED_CALLS}.parquet",
            extract.deleted_global_ids(crm, cfg.crm.call.object, window) if cfg.features.medical_activities else [],
            extract.DELETED_COLUMNS)

    staged = extract.in_parallel(cfg.load.concurrency, {CALLS: stage_calls, DELETED_CALLS: stage_deleted})
    persons = person_query(cfg).paged(page_size)
    staged[PERSONS] = staging.write_frames(
        f"{run_dir}/{PERSONS}.parquet",
        extract.frames_side_by_side(ctms, persons.contains(cfg.identifiers.ctms_person_field, identifiers),
                                    cfg.load.concurrency),
        persons.columns)
    return staged


def quality_rules(cfg, today=None) -> list:
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


def reference(staged, cfg) -> dict:
    from clinical_crm.engine import staging

    return {"persons": staging.read_frame(staged.path(PERSONS))}


def call_checks(calls, ref: dict, cfg):
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


def medical_activities(calls, cfg) -> list[dict]:
    """Validated CRM calls (with their matched `person_id`) -> CTMS Medical Activities."""
    c, a = cfg.crm.call.fields, cfg.ctms.activity.fields

    def fields(row: dict) -> dict:
        return {OBJECT_TYPE_API_NAME: cfg.ctms.activity.medical_type, a.person: text(row["person_id"]),
                a.date: text(row.get(c.date)), a.channel: rules.ctms_channel(row.get(c.channel), cfg),
                a.complete: rules.ctms_complete(row.get(c.status), cfg),
                a.from_: rules.creator_label(row, cfg.crm.user.fields), a.subject: text(row.get(c.subject))}

    return target_records(calls, a.external_id, fields)


def medical_type(cfg) -> str:
    """Medical Activities only: never Clinical Activities (same object)."""
    return f"{OBJECT_TYPE_API_NAME} = {vql.quote(cfg.ctms.activity.medical_type)}"


def complete_as_boolean(record: dict, cfg) -> dict:
    """Staged as text; Complete is a Yes/No field."""
    field = cfg.ctms.activity.fields.complete
    return record | {field: record.get(field) == "true"}


FLOW = Flow(
    name="crm_to_ctms",
    source_side="crm",
    target_side="ctms",
    describe=lambda cfg: ("Receives CRM calls flagged *Send to Vault Clinical* as CTMS **Medical Activities**; "
                          "deleted calls inactivate their Medical Activity."),
    extraction=Extraction(stage=stage, counts=lambda cfg: {CALLS: (cfg.crm.call.object, "extracted"),
                                                           DELETED_CALLS: (cfg.crm.call.object, "deleted")}),
    validation=Validation(source=CALLS, source_object=lambda cfg: cfg.crm.call.object,
                          feature=lambda cfg: cfg.features.medical_activities, rules=quality_rules,
                          reference=reference, checks=call_checks, matched_column="person_id"),
    targets=(
        Target("medical_activities", VALID, lambda cfg: cfg.crm.call.object, lambda cfg: cfg.ctms.activity.object,
               lambda cfg: cfg.ctms.activity.fields.external_id, medical_activities, holds_quarantine=True,
               prepare=complete_as_boolean, where=medical_type),
    ),
    deletions=(
        DeletionMark(
            staged=DELETED_CALLS, source_object=lambda cfg: cfg.crm.call.object,
            target_object=lambda cfg: cfg.ctms.activity.object,
            external_id=lambda cfg: cfg.ctms.activity.fields.external_id,
            read_fields=lambda cfg: [STATUS],
            where=medical_type,
            change=lambda row, cfg: {STATUS: cfg.deletion.ctms_inactive_status},
            already_message="already inactive",
            enabled=lambda cfg: cfg.features.medical_activities),
    ),
)
