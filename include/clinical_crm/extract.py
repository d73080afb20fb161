"""Extract: VQL built from the configuration for a window, paged into staged parquet files.

Every value enters VQL through vql.quote / vql.in_list. API calls are kept to the floor: one
query per object (pages follow), relationship fields one level deep instead of extra lookups,
and identifier lookups in CONTAINS chunks as large as VQL allows.

CTMS -> CRM reads Clinical Activities only (never Medical Activities: no echo loop); CRM -> CTMS
reads only calls flagged to be sent to Vault Clinical (never the interactions it receives).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone

import pandas as pd

from clinical_crm import staging, vql
from clinical_crm.transform import (
    CREATED_BY,
    GLOBAL_ID,
    ID,
    MODIFIED_DATE,
    NAME,
    OBJECT_TYPE_API_NAME,
    global_id,
    relationship,
    study_reference_columns,
    text,
)
from clinical_crm.windows import Window

log = logging.getLogger(__name__)

# Staged file names of one run (XCom carries {name: {path, rows}}).
CLINICAL_ACTIVITIES = "clinical_activities"
STUDIES = "studies"
STUDY_SITES = "study_sites"
ACCOUNTS = "accounts"
KNOWN_STUDIES = "known_studies"
KNOWN_SITES = "known_sites"
DELETED_ACTIVITIES = "deleted_clinical_activities"
DELETED_STUDIES = "deleted_studies"
DELETED_SITES = "deleted_study_sites"
CALLS = "calls"
PERSONS = "persons"
DELETED_CALLS = "deleted_calls"

# Vault keeps the ids of deleted records for 30 days (REFERENCE.md: deletions API); the margin
# keeps a request (and its later pages) inside that limit whatever the clocks say
DELETIONS_KEPT = timedelta(days=30)
DELETIONS_MARGIN = timedelta(minutes=10)


def select(fields: Iterable[str]) -> str:
    """A SELECT list without duplicates, in order."""
    return ", ".join(dict.fromkeys(f for f in fields if f))


def window_filter(window: Window) -> str:
    return f"{MODIFIED_DATE} > {vql.quote(window.start)} AND {MODIFIED_DATE} <= {vql.quote(window.end)}"


def contains_queries(statement: str, field: str, values: Iterable[str], page_size: int | None = None) -> Iterator[str]:
    """`statement` + `<field> CONTAINS (...)`, split so that every statement fits Vault's limit."""
    values = sorted({v for v in values if v})
    joiner = " AND " if " WHERE " in statement else " WHERE "
    head = f"{statement}{joiner}{field} CONTAINS "
    room = vql.VQL_MAX_CHARS - len(head) - 100
    chunks = page_aligned_chunks(values, room, page_size) if page_size else vql.chunk_values(values, room=room)
    for chunk in chunks:
        yield head + vql.in_list(chunk)


def page_aligned_chunks(values: list[str], room: int, page_size: int) -> Iterator[list[str]]:
    """Chunks as large as `room` allows, cut to a multiple of `page_size` when a chunk holds more
    than a page: a lookup that matches one record per value then needs ceil(values / page)
    pages in all (5,000 identifiers: 5 pages, not 4 + 2)."""
    i = 0
    while i < len(values):
        size, cost = 0, 2
        while i + size < len(values):
            step = len(vql.quote(values[i + size])) + 1
            if cost + step > room:
                break
            cost += step
            size += 1
        if size == 0:
            raise ValueError(f"a single value does not fit in {room} characters of VQL")
        if i + size < len(values) and size > page_size:
            size -= size % page_size
        yield values[i:i + size]
        i += size


def query_pages(client, statements: Iterable[str], page_size: int | None = None) -> Iterator[pd.DataFrame]:
    """Every page of every statement; `page_size` asks Vault for pages of that size (it may lower it)."""
    for statement in statements:
        yield from client.query(f"{statement} PAGESIZE {int(page_size)}" if page_size else statement)


# ---------------------------------------------------------------- CTMS -> CRM


def user_columns(cfg_user_fields) -> list[str]:
    f = cfg_user_fields
    return [f"{CREATED_BY}.{f.first_name}", f"{CREATED_BY}.{f.last_name}", f"{CREATED_BY}.{f.email}"]


def person_identifier_column(cfg) -> str:
    return f"{relationship(cfg.ctms.activity.fields.person)}.{cfg.identifiers.ctms_person_field}"


def clinical_activity_query(cfg) -> str:
    """SELECT ... FROM the activity object WHERE it is a Clinical Activity (no WHERE on time yet)."""
    a = cfg.ctms.activity.fields
    person = relationship(a.person)
    p = cfg.ctms.person.fields
    refs = study_reference_columns(cfg)
    fields = [
        ID, GLOBAL_ID, MODIFIED_DATE, a.person, person_identifier_column(cfg),
        f"{person}.{p.first_name}", f"{person}.{p.last_name}",
        a.date, a.channel, a.complete, a.subject,
        *user_columns(cfg.ctms.user.fields),
        a.study, a.site, a.study_country, a.study_person,
    ]
    if cfg.features.studies_and_sites:
        fields += [refs["study"], refs["site"],
                   f"{relationship(a.study_country)}.{cfg.ctms.study_country.fields.country}"]
    return (f"SELECT {select(fields)} FROM {cfg.ctms.activity.object} "
            f"WHERE {OBJECT_TYPE_API_NAME} = {vql.quote(cfg.ctms.activity.clinical_type)}")


def study_query(cfg) -> str:
    s = cfg.ctms.study.fields
    return (f"SELECT {select([ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.title, s.phase, s.therapeutic_area])} "
            f"FROM {cfg.ctms.study.object}")


def site_query(cfg) -> str:
    s = cfg.ctms.site.fields
    fields = [ID, GLOBAL_ID, MODIFIED_DATE, NAME, s.site_name, s.study, f"{relationship(s.study)}.{GLOBAL_ID}",
              f"{relationship(s.study_country)}.{cfg.ctms.study_country.fields.country}"]
    return f"SELECT {select(fields)} FROM {cfg.ctms.site.object}"


def deleted_global_ids(client, object_name: str, window: Window, now: datetime | None = None) -> Iterator[pd.DataFrame]:
    """Deleted record ids in the window, with the global id their target records carry.

    A window reaching back past what Vault keeps (a backfill of old windows, a first run from an
    old start date) is read from the oldest day kept, with a warning naming the part that can no
    longer be read: records deleted then keep their target state."""
    oldest = (now or datetime.now(timezone.utc)) - DELETIONS_KEPT + DELETIONS_MARGIN
    start = min(max(window.start, oldest), window.end)
    if start > window.start:
        log.warning("deletions of %s between %s and %s cannot be read: Vault keeps deleted record ids for "
                    "%d days; records deleted then keep their state in the target (check them by hand)",
                    object_name, window.start.isoformat(), start.isoformat(), DELETIONS_KEPT.days)
    if start >= window.end:
        return  # nothing of this window is still kept: no call (Vault refuses older start dates)
    for page in client.deletions(object_name, start, window.end):
        if page.empty:
            continue
        yield pd.DataFrame({ID: page[ID].astype(str),
                            GLOBAL_ID: [global_id(client.vault_id, i) for i in page[ID]]})


def extract_ctms_to_crm(cfg, ctms, crm, window: Window, run_dir: str,
                        activity_ids: Iterable[str] = (), ledger=None) -> dict[str, dict]:
    """Stage everything a CTMS -> CRM run needs; returns {name: {path, rows}}.

    `activity_ids`: Clinical Activities to read by id whatever their modification time
    (records quarantined before, activities the automation just wrote).
    """
    staged: dict[str, dict] = {}
    identifiers: set[str] = set()
    study_refs: set[str] = set()
    site_refs: set[str] = set()
    refs = study_reference_columns(cfg)
    ident_col = person_identifier_column(cfg)

    def collect(pages: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for page in pages:
            if ident_col in page:
                identifiers.update(v for v in map(text, page[ident_col]) if v)
            if cfg.features.studies_and_sites:
                study_refs.update(v for v in map(text, page.get(refs["study"], [])) if v)
                site_refs.update(v for v in map(text, page.get(refs["site"], [])) if v)
            yield page

    studies_on = cfg.features.studies_and_sites
    base = clinical_activity_query(cfg)
    columns = [c.strip() for c in base.split(" FROM ")[0].removeprefix("SELECT ").split(",")]
    statements = []
    if cfg.features.clinical_activities:
        # ORDER BY the window's own field: each page continues along the modified-date index
        # (unordered, the sandbox sorted the whole window for every page: 1,000,000 activities
        # took ~6 s a page instead of ~0.03 s); ids break ties, so pages never overlap
        statements.append(f"{base} AND {window_filter(window)} ORDER BY {MODIFIED_DATE}")
        statements += list(contains_queries(base, ID, activity_ids))
    staged[CLINICAL_ACTIVITIES] = staging.write_frames(
        f"{run_dir}/{CLINICAL_ACTIVITIES}.parquet", collect(query_pages(ctms, statements, cfg.load.query_page_size)), columns)

    if studies_on:
        # Studies / Sites changed in the window, plus those the activities (and sites) refer to
        # that CRM does not have yet (never sent: e.g. unchanged since before the first run), so
        # the study information of every activity resolves.
        site_study_refs: set[str] = set()
        known_sites: set[str] = set()
        staged[STUDY_SITES] = staging.write_frames(
            f"{run_dir}/{STUDY_SITES}.parquet",
            _changed_and_referenced(cfg, ctms, ledger, site_query(cfg), window, site_refs,
                                    cfg.crm.clinical_site.object, known_sites,
                                    lambda page: site_study_refs.update(
                                        v for v in map(text, page[f"{relationship(cfg.ctms.site.fields.study)}.{GLOBAL_ID}"]) if v)))
        known_studies: set[str] = set()
        staged[STUDIES] = staging.write_frames(
            f"{run_dir}/{STUDIES}.parquet",
            _changed_and_referenced(cfg, ctms, ledger, study_query(cfg), window, study_refs | site_study_refs,
                                    cfg.crm.clinical_study.object, known_studies))
        staged[KNOWN_STUDIES] = staging.write_frames(
            f"{run_dir}/{KNOWN_STUDIES}.parquet", [pd.DataFrame({"external_id": sorted(known_studies)})], ["external_id"])
        staged[KNOWN_SITES] = staging.write_frames(
            f"{run_dir}/{KNOWN_SITES}.parquet", [pd.DataFrame({"external_id": sorted(known_sites)})], ["external_id"])
        staged[DELETED_STUDIES] = staging.write_frames(
            f"{run_dir}/{DELETED_STUDIES}.parquet",
            deleted_global_ids(ctms, cfg.ctms.study.object, window), [ID, GLOBAL_ID])
        staged[DELETED_SITES] = staging.write_frames(
            f"{run_dir}/{DELETED_SITES}.parquet",
            deleted_global_ids(ctms, cfg.ctms.site.object, window), [ID, GLOBAL_ID])

    if cfg.features.clinical_activities:
        staged[DELETED_ACTIVITIES] = staging.write_frames(
            f"{run_dir}/{DELETED_ACTIVITIES}.parquet",
            deleted_global_ids(ctms, cfg.ctms.activity.object, window), [ID, GLOBAL_ID])

    account_field = cfg.identifiers.crm_account_field
    statement = f"SELECT {select([ID, account_field])} FROM {cfg.crm.account.object}"
    staged[ACCOUNTS] = staging.write_frames(
        f"{run_dir}/{ACCOUNTS}.parquet",
        query_pages(crm, contains_queries(statement, account_field, identifiers, cfg.load.query_page_size),
                    cfg.load.query_page_size),
        [ID, account_field])
    log.info("extracted %s", {k: v["rows"] for k, v in staged.items()})
    return staged


def _changed_and_referenced(cfg, ctms, ledger, statement: str, window: Window, refs: set[str],
                            crm_object: str, known: set[str], on_page=None) -> Iterator[pd.DataFrame]:
    """Pages of the records changed in the window and of the referenced ones (by global id) not
    loaded before (ledger), in ONE statement: `(changed) OR global_id CONTAINS (...)` (when the
    list needs more statements, the later ones exclude the window, so no record comes twice).
    `known` collects every global id that resolves in CRM after this run's load: this run's
    records and the ledger's."""

    def pages(statements):
        for page in query_pages(ctms, statements, cfg.load.query_page_size):
            known.update(v for v in map(text, page[GLOBAL_ID]) if v)
            if on_page is not None:
                on_page(page)
            yield page

    missing = {r for r in refs if r}
    if missing and ledger is not None:
        loaded = ledger.known_external_ids(cfg.name, crm_object, missing)
        known.update(loaded)
        missing -= loaded
    changed = window_filter(window)
    if not missing:
        yield from pages([f"{statement} WHERE {changed}"])
        return
    outside = (f"({MODIFIED_DATE} <= {vql.quote(window.start)} OR {MODIFIED_DATE} > {vql.quote(window.end)})")
    first_head = f"{statement} WHERE ({changed}) OR {GLOBAL_ID} CONTAINS "
    room = vql.VQL_MAX_CHARS - max(len(first_head), len(f"{statement} WHERE {outside} AND {GLOBAL_ID} CONTAINS ")) - 100
    statements = []
    for i, chunk in enumerate(vql.chunk_values(sorted(missing), room=room)):
        statements.append(first_head + vql.in_list(chunk) if i == 0 else
                          f"{statement} WHERE {outside} AND {GLOBAL_ID} CONTAINS {vql.in_list(chunk)}")
    yield from pages(statements)


# ---------------------------------------------------------------- CRM -> CTMS


def account_identifier_column(cfg) -> str:
    return f"{relationship(cfg.crm.call.fields.account)}.{cfg.identifiers.crm_account_field}"


def call_query(cfg) -> str:
    """Calls flagged "Send to Vault Clinical" (no WHERE on time yet)."""
    c = cfg.crm.call.fields
    fields = [ID, GLOBAL_ID, MODIFIED_DATE, c.account, account_identifier_column(cfg), c.date, c.channel,
              c.status, c.subject, *user_columns(cfg.crm.user.fields)]
    return (f"SELECT {select(fields)} FROM {cfg.crm.call.object} "
            f"WHERE {c.send_to_clinical} = {vql.quote(True)}")


def extract_crm_to_ctms(cfg, ctms, crm, window: Window, run_dir: str, call_ids: Iterable[str] = ()) -> dict[str, dict]:
    """Stage the flagged calls of the window (and those quarantined before), their deletions and
    the CTMS Persons matching the calls' account identifiers."""
    staged: dict[str, dict] = {}
    identifiers: set[str] = set()
    ident_col = account_identifier_column(cfg)

    def collect(pages):
        for page in pages:
            if ident_col in page:
                identifiers.update(v for v in map(text, page[ident_col]) if v)
            yield page

    base = call_query(cfg)
    columns = [c.strip() for c in base.split(" FROM ")[0].removeprefix("SELECT ").split(",")]
    statements = []
    if cfg.features.medical_activities:
        statements = [f"{base} AND {window_filter(window)} ORDER BY {MODIFIED_DATE}",
                      *contains_queries(base, ID, call_ids)]
    staged[CALLS] = staging.write_frames(f"{run_dir}/{CALLS}.parquet", collect(query_pages(crm, statements, cfg.load.query_page_size)), columns)
    staged[DELETED_CALLS] = staging.write_frames(
        f"{run_dir}/{DELETED_CALLS}.parquet",
        deleted_global_ids(crm, cfg.crm.call.object, window) if cfg.features.medical_activities else [],
        [ID, GLOBAL_ID])
    person_field = cfg.identifiers.ctms_person_field
    statement = f"SELECT {select([ID, person_field])} FROM {cfg.ctms.person.object}"
    staged[PERSONS] = staging.write_frames(
        f"{run_dir}/{PERSONS}.parquet",
        query_pages(ctms, contains_queries(statement, person_field, identifiers), cfg.load.query_page_size),
        [ID, person_field])
    log.info("extracted %s", {k: v["rows"] for k, v in staged.items()})
    return staged
