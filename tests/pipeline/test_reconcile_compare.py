"""Reconciliation's comparison rules, without vaults (engine/reconcile.py; the story against
the sandbox is tests/e2e/test_reconcile.py)."""
from __future__ import annotations

from clinical_crm.engine import reconcile
from clinical_crm.flows import build


def test_values_compare_as_the_load_sends_them():
    assert reconcile.value(True) == "true" and reconcile.value("true") == "true"
    assert reconcile.value(["phone__v"]) == "phone__v" and reconcile.value([]) is None
    assert reconcile.value(" text ") == "text" and reconcile.value("") is None and reconcile.value(float("nan")) is None


def test_differences_name_each_field_with_both_values_and_skip_unset_references():
    record = {"subject__v": "Visit", "complete__v": True, "clinical_study__vr.external_id__v": None}
    row = {"subject__v": "Visit (edited)", "complete__v": True, "clinical_study__vr.external_id__v": "1_S1"}
    assert reconcile.differences(record, row, sorted(record)) == {
        "subject__v": {"expected": "Visit", "actual": "Visit (edited)"}}


def test_a_subject_mark_is_the_value_written_else_the_suffix(demo_cfg):
    mark = next(m for m in build("ctms_to_crm", demo_cfg).deletions if m.staged == "deleted_clinical_activities")
    marked, reverted = {"subject__v": "Visit Deleted"}, {"subject__v": "Visit"}
    written = {"expected": {"subject__v": "Visit Deleted"}}
    assert reconcile.carries_mark(mark, marked, written)
    assert not reconcile.carries_mark(mark, reverted, written)
    assert reconcile.carries_mark(mark, marked, None)  # no ledger value: the suffix
    # edited after the mark, still ending with the suffix: marked (a repair would append it again)
    assert reconcile.carries_mark(mark, {"subject__v": "Visit (checked) Deleted"}, written)
    assert not reconcile.carries_mark(mark, reverted, {"expected": None})


def test_a_status_mark_is_the_status(demo_cfg):
    [mark] = build("crm_to_ctms", demo_cfg).deletions
    assert reconcile.carries_mark(mark, {"status__v": "inactive__v"}, None)
    assert not reconcile.carries_mark(mark, {"status__v": "active__v"}, None)


def test_medical_activities_are_read_by_type(demo_cfg):
    [target] = build("crm_to_ctms", demo_cfg).targets
    assert target.where == "object_type__vr.api_name__v = 'medical_activity__v'"
    assert all(t.where is None for t in build("ctms_to_crm", demo_cfg).targets)
