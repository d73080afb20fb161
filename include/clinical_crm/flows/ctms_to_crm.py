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
from clinical_crm.flows import automated_activities
from clinical_crm.flows.base import VALID, DeletionMark, Extraction, Flow, PreStep, Target, Validation, target_records
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


# ---------------------------------------------------------------- columns and queries


def person_identifier_column(cfg) -> str:
    return f"{relationship(cfg.ctms.activity.fields.person)}.{cfg.identifiers.ctms_person_field}"


def study_reference_columns(cfg) -> dict[str, str]:
    """Staged columns holding the unique external ids (global ids) of an activity's study and site."""
    fields = cfg.ctms.activity.fields
    return {"study": f"{relationship(fields.study)}.{GLOBAL_ID}", "site": f"{relationship(fields.site)}.{GLOBAL_ID}"}


def activity_country_column(cfg) -> str:
    fields = cfg.ctms.activity.fields
    return f"{relationship(fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def site_study_column(cfg) -> str:
    return f"{relationship(cfg.ctms.site.fields.study)}.{GLOBAL_ID}"


def site_country_column(cfg) -> str:
    return f"{relationship(cfg.ctms.site.fields.study_country)}.{cfg.ctms.study_country.fields.country}"


def clinical_activity_query(cfg) -> Query:
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


def study_query(cfg) -> Query:
    s = cfg.ctms.study.fields
    return Query.select(cfg.ctms.study.object, [ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.title, s.phase, s.therapeutic_area])


def site_query(cfg) -> Query:
    s = cfg.ctms.site.fields
    return Query.select(cfg.ctms.site.object, [ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.site_name, s.study,
                                               site_study_column(cfg), site_country_column(cfg)])


def account_query(cfg) -> Query:
    return Query.select(cfg.crm.account.object, [ID, cfg.identifiers.crm_account_field])


# ---------------------------------------------------------------- extract


def stage(cfg, clients: dict, window, run_dir: str, reread_ids, ledger) -> dict:
    """Clinical Activities changed in the window (and those read again by id); the Studies and
    Sites changed in the window or referenced by them and not yet in CRM; deleted ids; the CRM
    Accounts matching the activities' Person identifiers.

    Two rounds of reads side by side (`load.concurrency` calls at most): the activities with the
    deletions, then what the activities refer to: the sites and, after them, the studies (sites
    refer to studies too) beside the accounts."""
    import pandas as pd

    from clinical_crm.engine import extract, staging

    ctms, crm = clients["ctms"], clients["crm"]
    page_size = cfg.load.query_page_size
    concurrency = cfg.load.concurrency
    identifiers: set[str] = set()
    study_refs: set[str] = set()
    site_refs: set[str] = set()
    refs = study_reference_columns(cfg)

    def stage_activities():
        activities = clinical_activity_query(cfg).paged(page_size)
        queries = extract.changed_or_by_id(activities, window, reread_ids) if cfg.features.clinical_activities else []
        pages = extract.collect(extract.frames(ctms, queries), identifiers, person_identifier_column(cfg))
        if cfg.features.studies_and_sites:
            pages = extract.collect(extract.collect(pages, study_refs, refs["study"]), site_refs, refs["site"])
        return staging.write_frames(f"{run_dir}/{CLINICAL_ACTIVITIES}.parquet", pages, activities.columns)

    def stage_deleted(name, obj):
        return lambda: staging.write_frames(f"{run_dir}/{name}.parquet", extract.deleted_global_ids(ctms, obj, window),
                                            extract.DELETED_COLUMNS)

    first = {CLINICAL_ACTIVITIES: stage_activities}
    if cfg.features.clinical_activities:
        first[DELETED_ACTIVITIES] = stage_deleted(DELETED_ACTIVITIES, cfg.ctms.activity.object)
    if cfg.features.studies_and_sites:
        first[DELETED_STUDIES] = stage_deleted(DELETED_STUDIES, cfg.ctms.study.object)
        first[DELETED_SITES] = stage_deleted(DELETED_SITES, cfg.ctms.site.object)
    staged = extract.in_parallel(concurrency, first)

    def changed_or_referenced(query, crm_object, references, known, *more):
        """Studies / Sites changed in the window, plus those referenced that CRM does not have
        yet (never sent: e.g. unchanged since before the first run), so the study information
        of every activity resolves. `known`: every global id that resolves in CRM after this
        run's load (this run's records and the ledger's)."""
        missing = {r for r in references if r}
        if missing:
            loaded = ledger.known_external_ids(cfg.name, crm_object, missing)
            known.update(loaded)
            missing -= loaded
        queries = extract.changed_or_referenced(query.paged(page_size), window, missing)
        return extract.collect(extract.frames(ctms, queries), known, GLOBAL_ID, *more)

    def stage_sites_then_studies():
        out = {}
        site_study_refs: set[str] = set()
        known_sites: set[str] = set()
        site_pages = changed_or_referenced(site_query(cfg), cfg.crm.clinical_site.object, site_refs, known_sites)
        out[STUDY_SITES] = staging.write_frames(
            f"{run_dir}/{STUDY_SITES}.parquet", extract.collect(site_pages, site_study_refs, site_study_column(cfg)))
        known_studies: set[str] = set()
        out[STUDIES] = staging.write_frames(f"{run_dir}/{STUDIES}.parquet", changed_or_referenced(
            study_query(cfg), cfg.crm.clinical_study.object, study_refs | site_study_refs, known_studies))
        for name, known in ((KNOWN_STUDIES, known_studies), (KNOWN_SITES, known_sites)):
            out[name] = staging.write_frames(f"{run_dir}/{name}.parquet",
                                             [pd.DataFrame({"external_id": sorted(known)})], ["external_id"])
        return out

    def stage_accounts():
        accounts = account_query(cfg).paged(page_size)
        chunks = accounts.contains(cfg.identifiers.crm_account_field, identifiers, page_aligned=True)
        lookups = concurrency - 1 if cfg.features.studies_and_sites else concurrency  # beside the sites' reads
        return staging.write_frames(f"{run_dir}/{ACCOUNTS}.parquet",
                                    extract.frames_side_by_side(crm, chunks, max(1, lookups)), accounts.columns)

    second = {ACCOUNTS: stage_accounts}
    if cfg.features.studies_and_sites:
        second["sites_then_studies"] = stage_sites_then_studies  # stages several files
    done = extract.in_parallel(concurrency, second)
    staged[ACCOUNTS] = done.pop(ACCOUNTS)
    for files in done.values():
        staged.update(files)
    return staged


def extraction_counts(cfg) -> dict[str, tuple[str, str]]:
    return {CLINICAL_ACTIVITIES: (cfg.ctms.activity.object, "extracted"),
            DELETED_ACTIVITIES: (cfg.ctms.activity.object, "deleted"),
            STUDIES: (cfg.ctms.study.object, "extracted"), DELETED_STUDIES: (cfg.ctms.study.object, "deleted"),
            STUDY_SITES: (cfg.ctms.site.object, "extracted"), DELETED_SITES: (cfg.ctms.site.object, "deleted")}


# ---------------------------------------------------------------- validate


def quality_rules(cfg, today=None) -> list:
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


def reference(staged, cfg) -> dict:
    """The CRM Accounts found for this run's identifiers, and the studies / sites CRM will know."""
    from clinical_crm.engine import staging

    def known(name):
        return set(staging.read_frame(staged.path(name)).get("external_id", []))

    return {"accounts": staging.read_frame(staged.path(ACCOUNTS)),
            "studies": known(KNOWN_STUDIES), "sites": known(KNOWN_SITES)}


def activity_checks(activities, ref: dict, cfg):
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


def clinical_interactions(activities, cfg) -> list[dict]:
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


def study_information(row: dict, cfg) -> dict:
    """Study / site / country of an activity, as CRM interaction fields. References are set
    through the CRM record's unique external id (the CTMS global id), so no CRM id lookup is needed."""
    refs = study_reference_columns(cfg)
    crm = cfg.crm
    fields = crm.interaction.fields
    return {
        f"{relationship(fields.study)}.{crm.clinical_study.fields.external_id}": text(row.get(refs["study"])),
        f"{relationship(fields.site)}.{crm.clinical_site.fields.external_id}": text(row.get(refs["site"])),
        fields.study_country: text(row.get(activity_country_column(cfg))),
    }


def clinical_studies(studies, cfg) -> list[dict]:
    """CTMS Studies -> CRM Clinical Studies (created or updated; marked active)."""
    s = cfg.ctms.study.fields
    c = cfg.crm.clinical_study.fields
    return target_records(studies, c.external_id, lambda row: {
        NAME: text(row.get(NAME)), c.title: text(row.get(s.title)), c.phase: text(row.get(s.phase)),
        c.therapeutic_area: text(row.get(s.therapeutic_area)),
        cfg.deletion.crm_status_field: cfg.deletion.crm_active_status})


def clinical_sites(sites, cfg) -> list[dict]:
    """CTMS Study Sites -> CRM Clinical Sites, linked to their Clinical Study by external id."""
    s = cfg.ctms.site.fields
    c = cfg.crm.clinical_site.fields
    study_ext = cfg.crm.clinical_study.fields.external_id
    return target_records(sites, c.external_id, lambda row: {
        NAME: text(row.get(NAME)), f"{relationship(c.study)}.{study_ext}": text(row.get(site_study_column(cfg))),
        c.site_name: text(row.get(s.site_name)), c.country: text(row.get(site_country_column(cfg))),
        cfg.deletion.crm_status_field: cfg.deletion.crm_active_status})


def _studies_and_sites(cfg) -> bool:
    return cfg.features.studies_and_sites


def _deleted_status(entity: str, staged: str, source_object) -> DeletionMark:
    """A deleted Study / Study Site: "Deleted in Vault Clinical" on its CRM record, if one exists."""
    return DeletionMark(
        staged=staged, source_object=source_object,
        target_object=lambda cfg: getattr(cfg.crm, entity).object,
        external_id=lambda cfg: getattr(cfg.crm, entity).fields.external_id,
        read_fields=lambda cfg: [cfg.deletion.crm_status_field],
        change=lambda row, cfg: {cfg.deletion.crm_status_field: cfg.deletion.crm_deleted_status},
        already_message="already marked deleted", enabled=_studies_and_sites)


def describe(cfg) -> str:
    return ("Sends CTMS **Clinical Activities** as CRM *Vault Clinical Interactions*"
            + (", and **Studies / Study Sites** as CRM *Clinical Studies / Sites*" if cfg.features.studies_and_sites else "")
            + (". Monitoring Events and Study Communication Logs marked *Activity Update Required* "
               "first get their Clinical Activity (automated activities)" if cfg.features.automated_activities else "")
            + ". Deleted activities get the subject suffix, deleted studies/sites the deleted status.")


FLOW = Flow(
    name="ctms_to_crm",
    source_side="ctms",
    target_side="crm",
    describe=describe,
    pre_step=PreStep("automate_activities",
                     enabled=lambda cfg: cfg.features.automated_activities and cfg.features.clinical_activities,
                     run=automated_activities.run),
    extraction=Extraction(stage=stage, counts=extraction_counts),
    validation=Validation(source=CLINICAL_ACTIVITIES, source_object=lambda cfg: cfg.ctms.activity.object,
                          feature=lambda cfg: cfg.features.clinical_activities, rules=quality_rules,
                          reference=reference, checks=activity_checks, matched_column="account_id"),
    # Studies, then Sites (they refer to Studies), then interactions (they refer to both)
    targets=(
        Target("clinical_studies", STUDIES, lambda cfg: cfg.ctms.study.object,
               lambda cfg: cfg.crm.clinical_study.object, lambda cfg: cfg.crm.clinical_study.fields.external_id,
               clinical_studies, enabled=_studies_and_sites),
        Target("clinical_sites", STUDY_SITES, lambda cfg: cfg.ctms.site.object,
               lambda cfg: cfg.crm.clinical_site.object, lambda cfg: cfg.crm.clinical_site.fields.external_id,
               clinical_sites, enabled=_studies_and_sites),
        Target("clinical_interactions", VALID, lambda cfg: cfg.ctms.activity.object,
               lambda cfg: cfg.crm.interaction.object, lambda cfg: cfg.crm.interaction.fields.external_id,
               clinical_interactions, holds_quarantine=True),
    ),
    deletions=(
        DeletionMark(
            staged=DELETED_ACTIVITIES, source_object=lambda cfg: cfg.ctms.activity.object,
            target_object=lambda cfg: cfg.crm.interaction.object,
            external_id=lambda cfg: cfg.crm.interaction.fields.external_id,
            read_fields=lambda cfg: [cfg.crm.interaction.fields.subject],
            change=lambda row, cfg: {cfg.crm.interaction.fields.subject: rules.deleted_subject(
                row.get(cfg.crm.interaction.fields.subject), cfg)},
            already_message="subject already marked deleted",
            enabled=lambda cfg: cfg.features.clinical_activities,
            carried=lambda row, cfg: (text(row.get(cfg.crm.interaction.fields.subject)) or "").endswith(
                cfg.deletion.subject_suffix)),
        _deleted_status("clinical_study", DELETED_STUDIES, lambda cfg: cfg.ctms.study.object),
        _deleted_status("clinical_site", DELETED_SITES, lambda cfg: cfg.ctms.site.object),
    ),
)
