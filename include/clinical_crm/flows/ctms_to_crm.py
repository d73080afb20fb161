"""CTMS -> Medical CRM: Clinical Activities become Vault Clinical Interactions; Studies and Study
Sites become Clinical Studies / Sites (update if found, else create) and their information
travels with each activity; deleted activities get "Deleted" appended to the interaction's
subject, deleted Studies / Sites the status "Deleted in Vault Clinical". Before extraction,
Monitoring Events and Study Communication Logs marked Activity Update Required get their
Clinical Activity (automated activities), sent in the same run.

Reads Clinical Activities only, never Medical Activities: no echo of what crm_to_ctms writes.
"""
from __future__ import annotations

from clinical_crm import rules
from clinical_crm.checks import (MAPPING_COMPLETENESS, Rule, add_match, check_frame, channel_rule, column_of, date_rule,
                                 identifier_rule, in_set, match_rule, not_null)
from clinical_crm.config import ClinicalSiteObject, ClinicalStudyObject, ConnectionConfig
from clinical_crm.flows import automated_activities
from clinical_crm.flows.base import (VALID, Deleted, DeletionMark, Flow, Lookup, Read, Referenced, Target, Validation,
                                     Windowed, known_ids, target_records)
from clinical_crm.values import blank, text
from clinical_crm.vault import Query, vql
from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE, NAME, OBJECT_TYPE_API_NAME, relationship

# Staged files of a run.
CLINICAL_ACTIVITIES = "clinical_activities"
STUDIES = "studies"
STUDY_SITES = "study_sites"
ACCOUNTS = "accounts"
KNOWN_STUDIES = "known_studies"
KNOWN_SITES = "known_sites"
DELETED_ACTIVITIES = "deleted_clinical_activities"
DELETED_STUDIES = "deleted_studies"
DELETED_SITES = "deleted_study_sites"
# Values collected from the activities (and sites) for the reads after them.
PERSON_IDENTIFIERS = "person identifiers"
STUDY_REFS = "study references"
SITE_REFS = "site references"
SITE_STUDY_REFS = "studies of sites"


# ---------------------------------------------------------------- columns and queries


def person_identifier_column(cfg: ConnectionConfig) -> str:
    return f"{relationship(cfg.ctms.activity.fields.person)}.{cfg.identifiers.ctms_person_field}"


def study_reference_columns(cfg: ConnectionConfig) -> dict[str, str]:
    """Staged columns holding the unique external ids (global ids) of an activity's study and site."""
    fields = cfg.ctms.activity.fields
    return {"study": f"{relationship(fields.study)}.{GLOBAL_ID}", "site": f"{relationship(fields.site)}.{GLOBAL_ID}"}


def activity_country_column(cfg: ConnectionConfig) -> str:
    fields = cfg.ctms.activity.fields
    return f"{relationship(fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def site_study_column(cfg: ConnectionConfig) -> str:
    return f"{relationship(cfg.ctms.site.fields.study)}.{GLOBAL_ID}"


def site_country_column(cfg: ConnectionConfig) -> str:
    return f"{relationship(cfg.ctms.site.fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def clinical_activity_query(cfg: ConnectionConfig) -> Query:
    """Clinical Activities with their Person's identifier and id (empty when the Person record is
    gone; never the Person's name: nothing needs it), the creating user, and
    (with studies and sites) the global ids of their study and site."""
    a = cfg.ctms.activity.fields
    person = relationship(a.person)
    fields = [ID, GLOBAL_ID, MODIFIED_DATE, a.person, person_identifier_column(cfg),
              f"{person}.{ID}", a.date, a.channel, a.complete, a.subject,
              *rules.creator_columns(cfg.ctms.user.fields), a.study, a.site, a.study_country, a.study_person]
    if cfg.features.studies_and_sites:
        refs = study_reference_columns(cfg)
        fields += [refs["study"], refs["site"], activity_country_column(cfg)]
    return (Query.select(cfg.ctms.activity.object, fields)
            .filter(f"{OBJECT_TYPE_API_NAME} = {vql.quote(cfg.ctms.activity.clinical_type)}"))


def study_query(cfg: ConnectionConfig) -> Query:
    s = cfg.ctms.study.fields
    return Query.select(cfg.ctms.study.object, [ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.title, s.phase, s.therapeutic_area])


def site_query(cfg: ConnectionConfig) -> Query:
    s = cfg.ctms.site.fields
    return Query.select(cfg.ctms.site.object, [ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.site_name, s.study,
                                               site_study_column(cfg), site_country_column(cfg)])


def account_query(cfg: ConnectionConfig) -> Query:
    return Query.select(cfg.crm.account.object, [ID, cfg.identifiers.crm_account_field])


# ---------------------------------------------------------------- validate


def quality_rules(cfg: ConnectionConfig, today=None) -> list:
    """Clinical Activities going to CRM: Person present, with an identifier that matches exactly
    one CRM Account; channel mapped; a sensible date; study and site known in CRM."""
    ident = cfg.identifiers
    channels = list(cfg.channel_map)
    checks = [
        Rule("person_present", MAPPING_COMPLETENESS, "person", not_null("person"),
             lambda r: "no Person on the Clinical Activity"),
        identifier_rule("person_has_identifier", "person_identifier", "person", "person_found", "Person", "CTMS",
                        ident.ctms_person_field),
        channel_rule(channels),
        date_rule(today),
    ]
    if cfg.features.studies_and_sites:
        checks += [
            Rule("study_resolvable", MAPPING_COMPLETENESS, "study_resolved", in_set("study_resolved", [True]),
                 lambda r: f"Study {r['study_ref']} has no Clinical Study in CRM (not sent yet)"),
            Rule("site_resolvable", MAPPING_COMPLETENESS, "site_resolved", in_set("site_resolved", [True]),
                 lambda r: f"Study Site {r['site_ref']} has no Clinical Site in CRM (not sent yet)"),
        ]
    checks.append(match_rule("person_account_match", "account_matches", "person_identifier", "CRM Account",
                             ident.crm_account_field))
    return checks


def activity_checks(activities, ref: dict, cfg: ConnectionConfig):
    """The check frame of Clinical Activities, plus `account_id` for the rows that match."""
    a = cfg.ctms.activity.fields
    person = relationship(a.person)
    col = column_of(activities)
    checks = check_frame(activities, col(a.channel), col(a.date))
    checks["person"] = col(a.person).map(text)
    checks["person_identifier"] = col(person_identifier_column(cfg)).map(text)
    checks["person_found"] = col(f"{person}.{ID}").map(text)
    if cfg.features.studies_and_sites:
        refs = study_reference_columns(cfg)
        checks["study_ref"] = col(refs["study"]).map(text)
        checks["site_ref"] = col(refs["site"]).map(text)
        checks["study_resolved"] = checks["study_ref"].map(lambda v: blank(v) or v in ref["studies"]).astype(bool)
        checks["site_resolved"] = checks["site_ref"].map(lambda v: blank(v) or v in ref["sites"]).astype(bool)
    add_match(checks, "person_identifier", ref["accounts"], cfg.identifiers.crm_account_field,
              "account_matches", "account_id")
    return checks


# ---------------------------------------------------------------- target records


def clinical_interactions(activities, cfg: ConnectionConfig) -> list[dict]:
    """Validated Clinical Activities (with their matched `account_id`) -> CRM interactions."""
    a = cfg.ctms.activity.fields
    i = cfg.crm.interaction.fields

    def fields(row: dict) -> dict:
        record = {
            i.account: text(row["account_id"]),
            i.date: text(row.get(a.date)),
            i.channel: rules.crm_channel(row.get(a.channel), cfg),
            i.status: rules.crm_status(row.get(a.complete), cfg),
            i.from_: rules.creator_label(row, cfg.ctms.user.fields),
            i.subject: text(row.get(a.subject)),
            i.context: rules.activity_context(row, cfg),
        }
        return record | study_information(row, cfg) if cfg.features.studies_and_sites else record

    return target_records(activities, i.external_id, fields)


def study_targets(cfg: ConnectionConfig) -> tuple[ClinicalStudyObject, ClinicalSiteObject]:
    """The CRM objects receiving Studies and Sites (the configuration requires both when
    features.studies_and_sites is on)."""
    study, site = cfg.crm.clinical_study, cfg.crm.clinical_site
    if study is None or site is None:
        raise ValueError(f"{cfg.source_file}: crm.clinical_study and crm.clinical_site are needed for studies and sites")
    return study, site


def study_information(row: dict, cfg: ConnectionConfig) -> dict:
    """Study / site / country of an activity, as CRM interaction fields. References are set
    through the CRM record's unique external id (the CTMS global id), so no CRM id lookup is needed."""
    refs = study_reference_columns(cfg)
    study, site = study_targets(cfg)
    fields = cfg.crm.interaction.fields
    return {
        f"{relationship(fields.study)}.{study.fields.external_id}": text(row.get(refs["study"])),
        f"{relationship(fields.site)}.{site.fields.external_id}": text(row.get(refs["site"])),
        fields.study_country: text(row.get(activity_country_column(cfg))),
    }


def clinical_studies(studies, cfg: ConnectionConfig) -> list[dict]:
    """CTMS Studies -> CRM Clinical Studies (created or updated; marked active)."""
    s = cfg.ctms.study.fields
    c = study_targets(cfg)[0].fields
    return target_records(studies, c.external_id, lambda row: {
        NAME: text(row.get(NAME)), c.title: text(row.get(s.title)), c.phase: text(row.get(s.phase)),
        c.therapeutic_area: text(row.get(s.therapeutic_area)),
        cfg.deletion.crm_status_field: cfg.deletion.crm_active_status})


def clinical_sites(sites, cfg: ConnectionConfig) -> list[dict]:
    """CTMS Study Sites -> CRM Clinical Sites, linked to their Clinical Study by external id."""
    s = cfg.ctms.site.fields
    study, site = study_targets(cfg)
    c, study_ext = site.fields, study.fields.external_id
    return target_records(sites, c.external_id, lambda row: {
        NAME: text(row.get(NAME)), f"{relationship(c.study)}.{study_ext}": text(row.get(site_study_column(cfg))),
        c.site_name: text(row.get(s.site_name)), c.country: text(row.get(site_country_column(cfg))),
        cfg.deletion.crm_status_field: cfg.deletion.crm_active_status})


def reads(cfg: ConnectionConfig) -> list[Read]:
    """Clinical Activities changed in the window (and those read again by id) with the deleted
    ids; the CRM Accounts matching the activities' Person identifiers; the Sites, then the
    Studies (sites refer to studies too), changed in the window or referenced by the activities
    and not yet in CRM."""
    page_size = cfg.load.query_page_size
    ctms, features = cfg.ctms, cfg.features
    found: list[Read] = []
    if features.clinical_activities:
        collects = {PERSON_IDENTIFIERS: person_identifier_column(cfg)}
        if features.studies_and_sites:
            refs = study_reference_columns(cfg)
            collects |= {STUDY_REFS: refs["study"], SITE_REFS: refs["site"]}
        found += [Windowed(CLINICAL_ACTIVITIES, "ctms", ctms.activity.object, clinical_activity_query(cfg).paged(page_size),
                           collects=collects),
                  Deleted(DELETED_ACTIVITIES, "ctms", ctms.activity.object)]
    if features.studies_and_sites:
        found += [Deleted(DELETED_STUDIES, "ctms", ctms.study.object), Deleted(DELETED_SITES, "ctms", ctms.site.object)]
    if features.clinical_activities:
        found.append(Lookup(ACCOUNTS, "crm", account_query(cfg).paged(page_size), cfg.identifiers.crm_account_field,
                            (PERSON_IDENTIFIERS,), page_aligned=True))
    if features.studies_and_sites:
        clinical_study, clinical_site = study_targets(cfg)
        found += [Referenced(STUDY_SITES, "ctms", ctms.site.object, site_query(cfg).paged(page_size),
                             clinical_site.object, (SITE_REFS,), KNOWN_SITES,
                             collects={SITE_STUDY_REFS: site_study_column(cfg)}),
                  Referenced(STUDIES, "ctms", ctms.study.object, study_query(cfg).paged(page_size),
                             clinical_study.object, (STUDY_REFS, SITE_STUDY_REFS), KNOWN_STUDIES)]
    return found


def validation(cfg: ConnectionConfig) -> Validation:
    def checks(activities, ref: dict):
        return activity_checks(activities, {"accounts": ref[ACCOUNTS], "studies": known_ids(ref.get(KNOWN_STUDIES)),
                                            "sites": known_ids(ref.get(KNOWN_SITES))}, cfg)

    known = (KNOWN_STUDIES, KNOWN_SITES) if cfg.features.studies_and_sites else ()
    return Validation(CLINICAL_ACTIVITIES, cfg.ctms.activity.object, quality_rules(cfg), checks, (ACCOUNTS, *known),
                      matched_column="account_id")


def targets(cfg: ConnectionConfig) -> list[Target]:
    """Studies, then Sites (they refer to Studies), then interactions (they refer to both)."""
    ctms, crm = cfg.ctms, cfg.crm
    found = []
    if cfg.features.studies_and_sites:
        study, site = study_targets(cfg)
        found += [Target("clinical_studies", STUDIES, ctms.study.object, study.object, study.fields.external_id,
                         lambda rows: clinical_studies(rows, cfg)),
                  Target("clinical_sites", STUDY_SITES, ctms.site.object, site.object, site.fields.external_id,
                         lambda rows: clinical_sites(rows, cfg))]
    if cfg.features.clinical_activities:
        found.append(Target("clinical_interactions", VALID, ctms.activity.object, crm.interaction.object,
                            crm.interaction.fields.external_id, lambda rows: clinical_interactions(rows, cfg),
                            holds_quarantine=True))
    return found


def deletion_marks(cfg: ConnectionConfig) -> list[DeletionMark]:
    """A deleted activity: "Deleted" appended once to its interaction's subject; a deleted Study /
    Study Site: "Deleted in Vault Clinical" on its CRM record, if one exists."""
    ctms, crm, deletion = cfg.ctms, cfg.crm, cfg.deletion
    subject = crm.interaction.fields.subject
    found = []
    if cfg.features.clinical_activities:
        found.append(DeletionMark(
            DELETED_ACTIVITIES, ctms.activity.object, crm.interaction.object, crm.interaction.fields.external_id,
            read_fields=[subject], change=lambda row: {subject: rules.deleted_subject(row.get(subject), cfg)},
            already_message="subject already marked deleted",
            carried=lambda row: (text(row.get(subject)) or "").endswith(deletion.subject_suffix)))
    if cfg.features.studies_and_sites:
        status = {deletion.crm_status_field: deletion.crm_deleted_status}

        def deleted_status(row: dict) -> dict:
            return dict(status)

        clinical_study, clinical_site = study_targets(cfg)
        for staged, source, external_id, target in (
                (DELETED_STUDIES, ctms.study.object, clinical_study.fields.external_id, clinical_study.object),
                (DELETED_SITES, ctms.site.object, clinical_site.fields.external_id, clinical_site.object)):
            found.append(DeletionMark(staged, source, target, external_id, read_fields=[deletion.crm_status_field],
                                      change=deleted_status, already_message="already marked deleted"))
    return found


def describe(cfg: ConnectionConfig) -> str:
    return ("Sends CTMS **Clinical Activities** as CRM *Vault Clinical Interactions*"
            + (", and **Studies / Study Sites** as CRM *Clinical Studies / Sites*" if cfg.features.studies_and_sites else "")
            + (". Monitoring Events and Study Communication Logs marked *Activity Update Required* "
               "first get their Clinical Activity (automated activities)" if cfg.features.automated_activities else "")
            + ". Deleted activities get the subject suffix, deleted studies/sites the deleted status.")


def build(cfg: ConnectionConfig) -> Flow:
    features = cfg.features
    return Flow(
        name="ctms_to_crm", source_side="ctms", target_side="crm",
        conn_ids={"ctms": cfg.ctms_conn_id, "crm": cfg.crm_conn_id}, description=describe(cfg),
        reads=tuple(reads(cfg)), targets=tuple(targets(cfg)), deletions=tuple(deletion_marks(cfg)),
        validation=validation(cfg) if features.clinical_activities else None,
        pre_step=automated_activities.pre_step(cfg)
        if features.automated_activities and features.clinical_activities else None)
