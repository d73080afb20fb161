"""The field rules (rules.py, and the flows' record builders) and the window rule (windows.py): pure functions."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from clinical_crm import rules as t
from clinical_crm.flows import crm_to_ctms, ctms_to_crm
from clinical_crm.vault import QueryPage
from clinical_crm.engine.windows import run_window

UTC = timezone.utc


def test_channel_picklist_both_ways(demo_cfg):
    for ctms_value, crm_value in demo_cfg.channel_map.items():
        assert t.crm_channel(ctms_value, demo_cfg) == crm_value
        assert t.ctms_channel(crm_value, demo_cfg) == ctms_value
    assert t.crm_channel("fax__c", demo_cfg) is None
    assert t.crm_channel(None, demo_cfg) is None
    assert t.ctms_channel(float("nan"), demo_cfg) is None


def test_channel_map_is_read_from_the_configuration(demo_cfg):
    cfg = demo_cfg.model_copy(update={"channel_map": {"phone__v": "telephone__c"}})
    assert t.crm_channel("phone__v", cfg) == "telephone__c"
    assert t.ctms_channel("telephone__c", cfg) == "phone__v"


@pytest.mark.parametrize("complete, status", [
    (True, "submitted__v"), ("true", "submitted__v"), (False, "planned__v"), ("false", "planned__v"),
    (None, "planned__v"), ("", "planned__v"),
])
def test_complete_yes_is_submitted_otherwise_planned(demo_cfg, complete, status):
    assert t.crm_status(complete, demo_cfg) == status


@pytest.mark.parametrize("status, complete", [
    ("submitted__v", True), ("planned__v", False), ("saved__v", False), (None, False),
])
def test_inbound_status_submitted_is_complete(demo_cfg, status, complete):
    assert t.ctms_complete(status, demo_cfg) is complete


@pytest.mark.parametrize("first, last, email, label", [
    ("Claire", "Dubois", "clinops@sandbox.example", "Claire Dubois (clinops@sandbox.example)"),
    ("Jonas", "Berg", None, "Jonas Berg"),            # no email: readable, no empty parentheses
    (None, None, "x@example.com", "(x@example.com)"),
    (None, None, None, None),
    (" Ana ", float("nan"), "", "Ana"),
])
def test_from_label(first, last, email, label):
    assert t.from_label(first, last, email) == label


def test_deleted_subject_appends_the_suffix(demo_cfg):
    assert t.deleted_subject("Safety update", demo_cfg) == "Safety update Deleted"
    assert t.deleted_subject(None, demo_cfg) == "Deleted"
    # the text alone says nothing about what the connection did: "once" is the ledger's
    # (the deletion queue, tested end to end), so a subject ending in "Deleted" still gets it
    assert t.deleted_subject("Records Deleted", demo_cfg) == "Records Deleted Deleted"


def test_deletion_status_and_inactivation_updates(demo_cfg):
    marks = {m.staged: m for m in ctms_to_crm.build(demo_cfg).deletions + crm_to_ctms.build(demo_cfg).deletions}
    assert marks[ctms_to_crm.DELETED_STUDIES].change({"id": "X1"}) == {
        "vault_clinical_status__v": "deleted_in_vault_clinical__v"}
    assert marks[crm_to_ctms.DELETED_CALLS].change({"id": "A1"}) == {"status__v": "inactive__v"}
    assert marks[ctms_to_crm.DELETED_ACTIVITIES].change({"id": "I1", "subject__v": "Visit"}) == {
        "subject__v": "Visit Deleted"}


def test_automated_external_id_is_deterministic():
    assert t.automated_external_id("1001_V5M1") == t.automated_external_id("1001_V5M1")
    assert t.automated_external_id("1001_V5M1") != t.automated_external_id("1001_V5M2")


def activity_row(**overrides):
    row = {
        "id": "V1A1", "global_id__sys": "1001_V1A1", "modified_date__v": "2026-03-02T09:30:00.000Z",
        "account_id": "ACC1", "person__v": "P1",
        "activity_date__v": "2026-03-01", "channel__v": "video__v", "complete__v": "true",
        "subject__v": "Kick-off", "created_by__vr.first_name__sys": "Claire",
        "created_by__vr.last_name__sys": "Dubois", "created_by__vr.email__sys": "c@x.example",
        "study__v": "S1", "site__v": "SI1", "study_country__v": None, "study_person__v": None,
        "study__vr.global_id__sys": "1001_S1", "site__vr.global_id__sys": "1001_SI1",
        "study_country__vr.country__v": "France",
    }
    row.update(overrides)
    return row


def test_clinical_interaction_carries_every_rule(demo_cfg):
    [record] = ctms_to_crm.clinical_interactions(pd.DataFrame([activity_row()]), demo_cfg)
    assert record == {
        "_source_id": "V1A1", "_source_version": "2026-03-02T09:30:00.000Z", "external_id__v": "1001_V1A1",
        "account__v": "ACC1", "interaction_date__v": "2026-03-01",
        "call_channel__v": "video__v", "call2_status__v": "submitted__v",
        "from__v": "Claire Dubois (c@x.example)", "subject__v": "Kick-off", "context__v": "site",
        "clinical_study__vr.external_id__v": "1001_S1", "clinical_site__vr.external_id__v": "1001_SI1",
        "study_country__v": "France",
    }


def test_study_information_only_when_studies_are_sent(demo_cfg):
    features = demo_cfg.features.model_copy(update={"studies_and_sites": False})
    cfg = demo_cfg.model_copy(update={"features": features})
    [record] = ctms_to_crm.clinical_interactions(pd.DataFrame([activity_row()]), cfg)
    assert "clinical_study__vr.external_id__v" not in record


def test_activity_context_is_the_most_specific_level(demo_cfg):
    assert t.activity_context(activity_row(site__v=None), demo_cfg) == "study"
    assert t.activity_context(activity_row(study_person__v="SP1"), demo_cfg) == "study_person"


def test_medical_activity_from_call(demo_cfg):
    call = {"id": "C1", "global_id__sys": "2002_C1", "modified_date__v": "2026-02-03T08:00:00.000Z", "person_id": "P9",
            "call_date__v": "2026-02-02",
            "call_channel__v": "phone__v", "call2_status__v": "submitted__v", "subject__v": "Question",
            "created_by__vr.first_name__sys": "Sofia", "created_by__vr.last_name__sys": "Marino",
            "created_by__vr.email__sys": "medical@sandbox.example"}
    [record] = crm_to_ctms.medical_activities(pd.DataFrame([call]), demo_cfg)
    assert record == {
        "_source_id": "C1", "_source_version": "2026-02-03T08:00:00.000Z", "external_id__v": "2002_C1",
        "object_type__vr.api_name__v": "medical_activity__v", "person__v": "P9",
        "activity_date__v": "2026-02-02", "channel__v": "phone__v", "complete__v": True,
        "from__v": "Sofia Marino (medical@sandbox.example)", "subject__v": "Question",
    }


# ---------------------------------------------------------------- windows

T0 = datetime(2026, 1, 1, 10, tzinfo=UTC)
T1 = T0 + timedelta(hours=1)


def test_window_is_the_data_interval_less_the_lookback():
    w = run_window(T0, T1, None, 10)
    assert (w.start, w.end) == (T0 - timedelta(minutes=10), T1)


def test_window_reaches_back_to_the_last_success_after_a_failure():
    last_success = T0 - timedelta(hours=3)  # the runs of the two hours in between failed
    w = run_window(T0, T1, last_success, 10)
    assert w.start == last_success - timedelta(minutes=10)


def test_a_backfilled_older_window_keeps_its_own_start():
    w = run_window(T0 - timedelta(days=2), T0 - timedelta(days=2) + timedelta(hours=1), T1, 0)
    assert w.start == T0 - timedelta(days=2)


def test_manual_params_set_the_window():
    w = run_window(T0, T1, None, 10, window_start="2025-12-01T00:00:00Z", window_end="2025-12-02T00:00:00")
    assert (w.start, w.end) == (datetime(2025, 12, 1, tzinfo=UTC), datetime(2025, 12, 2, tzinfo=UTC))


def test_manual_run_without_interval_ends_now():
    now = datetime(2026, 5, 5, 12, tzinfo=UTC)
    w = run_window(None, None, T0, 5, now=now)
    assert (w.start, w.end) == (T0 - timedelta(minutes=5), now)
    first = run_window(None, None, None, 5, first_start=T0, now=now)
    assert first.start == T0


def test_window_start_after_end_is_refused():
    with pytest.raises(ValueError):
        run_window(None, None, None, 0, window_start="2026-02-01T00:00:00Z", window_end="2026-01-01T00:00:00Z")


def test_window_from_airflow_pendulum_datetimes():
    import pendulum

    start, end = pendulum.datetime(2026, 1, 1, 10, tz="UTC"), pendulum.datetime(2026, 1, 1, 11, tz="UTC")
    w = run_window(start, end, None, 10)
    assert w.start == T0 - timedelta(minutes=10) and w.start.tzinfo is not None and type(w.start) is datetime


def test_a_manual_run_reaches_the_moment_it_was_triggered_for():
    triggered = T0 + timedelta(minutes=37)
    interval = (T0 - timedelta(hours=1), T0)  # a manual run's inferred interval: the last full hour
    w = run_window(*interval, T0 - timedelta(hours=1), 10, triggered_at=triggered)
    assert w.end == triggered
    assert run_window(*interval, T0 - timedelta(hours=1), 10).end == T0  # scheduled runs: the interval end
    assert run_window(*interval, None, 10, window_end=T0, triggered_at=triggered).end == T0  # params win


class _DeletionsClient:
    vault_id = "1001"

    def __init__(self):
        self.asked = []

    def deletions(self, object_name, start, end):
        self.asked.append((start, end))
        yield QueryPage([{"id": "V1D1", "date_deleted": end.isoformat()}], ["id", "date_deleted"])


def test_deletions_are_read_only_as_far_back_as_vault_keeps_them(caplog):
    from clinical_crm.engine.extract import DELETIONS_KEPT, DELETIONS_MARGIN, deleted_global_ids
    from clinical_crm.engine.windows import Window

    now = datetime(2026, 11, 25, 12, tzinfo=timezone.utc)
    client = _DeletionsClient()
    recent = Window(now - timedelta(hours=1), now)
    frames = list(deleted_global_ids(client, "study__v", recent, now=now))
    assert client.asked == [(recent.start, recent.end)] and not caplog.records
    assert frames[0].to_dict("records") == [{"id": "V1D1", "global_id__sys": "1001_V1D1"}]

    old = Window(now - timedelta(days=90), now - timedelta(days=20))     # a first run from an old start date
    list(deleted_global_ids(client, "study__v", old, now=now))
    assert client.asked[-1] == (now - DELETIONS_KEPT + DELETIONS_MARGIN, old.end)
    assert "cannot be read: Vault keeps deleted record ids for 30 days" in caplog.text

    gone = Window(now - timedelta(days=60), now - timedelta(days=40))    # a backfill of a window Vault forgot
    assert list(deleted_global_ids(client, "study__v", gone, now=now)) == []
    assert len(client.asked) == 2                                         # no call for it
