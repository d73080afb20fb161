"""A third flow, for tests only: CTMS Studies -> CRM Clinical Studies under their title, a check
that every Study has one, and "Deleted in Vault Clinical" on the Clinical Study of a deleted
Study. It proves a new direction is one module: nothing outside this file and its test knows it
(it is found through $CLINICAL_CRM_FLOW_MODULES)."""
from __future__ import annotations

from clinical_crm import checks
from clinical_crm.config import ConnectionConfig
from clinical_crm.flows.base import VALID, Deleted, DeletionMark, Flow, Target, Validation, Windowed, target_records
from clinical_crm.values import text
from clinical_crm.vault import Query
from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE, NAME

STUDIES, DELETED = "titled_studies", "deleted_titled_studies"


def build(cfg: ConnectionConfig) -> Flow:
    study, clinical = cfg.ctms.study, cfg.crm.clinical_study
    assert clinical is not None
    title = study.fields.title
    deletion = cfg.deletion

    def check_frame(rows, reference):
        frame = checks.column_of(rows)
        found = rows[[ID]].rename(columns={ID: "source_id"})
        found["title"] = frame(title).map(text)
        found["clinical_study"] = None  # nothing to match: the external id is the global id
        return found

    def records(rows):
        return target_records(rows, clinical.fields.external_id, lambda row: {
            NAME: text(row.get(NAME)), clinical.fields.title: text(row.get(title)),
            deletion.crm_status_field: deletion.crm_active_status})

    rule = checks.Rule("study_has_title", checks.MAPPING_COMPLETENESS, "title", checks.not_null("title"),
                       lambda r: "the Study has no title")
    return Flow(
        name="study_titles", source_side="ctms", target_side="crm",
        conn_ids={"ctms": cfg.ctms_conn_id, "crm": cfg.crm_conn_id},
        description="Sends CTMS Study titles as CRM Clinical Studies (a test flow).",
        reads=(Windowed(STUDIES, "ctms", study.object,
                        Query.select(study.object, [ID, GLOBAL_ID, MODIFIED_DATE, NAME, title]).paged(cfg.load.query_page_size)),
               Deleted(DELETED, "ctms", study.object)),
        validation=Validation(STUDIES, study.object, [rule], check_frame, (), matched_column="clinical_study"),
        targets=(Target("titled_clinical_studies", VALID, study.object, clinical.object, clinical.fields.external_id,
                        records, holds_quarantine=True),),
        deletions=(DeletionMark(DELETED, study.object, clinical.object, clinical.fields.external_id,
                                read_fields=[deletion.crm_status_field],
                                change=lambda row: {deletion.crm_status_field: deletion.crm_deleted_status},
                                already_message="already marked deleted"),),
    )
