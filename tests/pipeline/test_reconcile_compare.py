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


def test_the_external_sort_merges_its_runs_in_string_order(tmp_path, monkeypatch):
    """The expected records meet the target's ORDER BY pages in one order: runs of RUN_ROWS
    sorted apart, then merged (here runs of 3 rows, read 2 at a time)."""
    import random

    import pandas as pd

    from clinical_crm.engine import staging

    keys = [f"1001_V{c}{i:02d}" for c in "AZa_0" for i in range(5)]
    shuffled = random.Random(7).sample(keys, len(keys))
    url = f"file://{tmp_path}/records.parquet"
    staging.write_frames(url, [pd.DataFrame({"external_id__v": shuffled, "n": [str(i) for i in range(len(keys))]})])
    monkeypatch.setattr(reconcile, "RUN_ROWS", 3)
    monkeypatch.setattr(reconcile, "MERGE_ROWS", 2)
    rows = list(reconcile.sorted_rows(url, "external_id__v", str(tmp_path)))
    assert [r["external_id__v"] for r in rows] == sorted(keys)
    assert {r["n"] for r in rows} == {str(i) for i in range(len(keys))}  # whole rows, each once


def test_changed_since_the_start_date():
    from datetime import datetime, timezone

    import pandas as pd

    frame = pd.DataFrame({"modified_date__v": ["2025-12-31T23:59:59.000Z", "2026-01-01T00:00:00.000Z",
                                               "2026-03-01T10:00:00.000Z", None]})
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    # at or after the start date; without a date: nothing says it is history
    assert reconcile.changed_since(frame, start).tolist() == [False, True, True, True]
    assert reconcile.changed_since(pd.DataFrame({"id": ["1"]}), start).tolist() == [True]


class _Pages:
    def __init__(self, records):
        self.records = records


class _Vault:
    """A vault client answering every query with these rows in this order (one page)."""

    def __init__(self, vault_id: str, rows: list[dict]):
        self.vault_id, self.rows, self.statements = vault_id, rows, []

    def query(self, query):
        self.statements.append(query)
        return iter([_Pages(list(self.rows))])


class _Ledger:
    def deletion_entries(self, *key):
        return {}

    def known_external_ids(self, *key):
        return set()


def _check(demo_cfg, tmp_path, target_rows):
    from datetime import datetime, timezone

    import pandas as pd

    from clinical_crm.engine import staging
    from clinical_crm.engine.context import Staged, StagedFile

    flow = build("ctms_to_crm", demo_cfg)
    target = next(t for t in flow.targets if t.target_object == "clinical_interaction__v")
    expected = [{"_source_id": f"A{i}", "_source_version": None, target.id_param: f"1001_A{i}", "subject__v": "Visit"}
                for i in (3, 1, 2)]
    records = staging.write_frames(f"file://{tmp_path}/records.parquet", [pd.DataFrame(expected)])
    sources = staging.write_frames(f"file://{tmp_path}/sources.parquet", [pd.DataFrame(
        {"id": ["A1", "A2", "A3", "OLD"], "global_id__sys": ["1001_A1", "1001_A2", "1001_A3", "1001_OLD"]})])
    clients = {"ctms": _Vault("1001", []), "crm": _Vault("2002", target_rows)}
    check = reconcile.TargetCheck(flow, target, demo_cfg, clients, _Ledger(),
                                  Staged({flow.validation.read: StagedFile(sources.path, sources.rows)}),
                                  Staged({target.records: StagedFile(records.path, records.rows)}),
                                  datetime(2026, 1, 1, tzinfo=timezone.utc))
    return check, clients["crm"]


TARGET_ROWS = [  # in external-id order, as ORDER BY external_id__v gives them
    {"id": "T1", "external_id__v": "1001_A1", "subject__v": "Visit", "modified_date__v": "2026-02-01T00:00:00.000Z"},
    {"id": "T2", "external_id__v": "1001_A2", "subject__v": "Edited", "modified_date__v": "2026-02-01T00:00:00.000Z"},
    {"id": "T4", "external_id__v": "1001_GONE_NEW", "subject__v": "X", "modified_date__v": "2026-02-01T00:00:00.000Z"},
    {"id": "T5", "external_id__v": "1001_GONE_OLD", "subject__v": "X", "modified_date__v": "2025-02-01T00:00:00.000Z"},
    {"id": "T6", "external_id__v": "1001_OLD", "subject__v": "Old", "modified_date__v": "2025-02-01T00:00:00.000Z"},
    {"id": "T7", "external_id__v": "77_OTHER_VAULT", "subject__v": "X", "modified_date__v": "2026-02-01T00:00:00.000Z"},
]


def test_the_merge_reports_each_kind_within_the_scope(demo_cfg, tmp_path):
    check, crm = _check(demo_cfg, tmp_path, TARGET_ROWS)
    found = {d["external_id"]: d["kind"] for d in check.drift()}
    # A3 missing, A2 stale; GONE_NEW extra (modified since the start date); GONE_OLD is history
    # before it and OLD's source exists (out of scope): neither is reported
    assert found == {"1001_A2": "stale", "1001_A3": "missing", "1001_GONE_NEW": "extra"}
    assert (check.expected, check.in_target) == (3, 5)
    assert crm.statements[0].order_by == "external_id__v"
    assert set(check.resend) == {"1001_A2", "1001_A3"}


def test_a_vault_order_other_than_ours_falls_back_to_a_sorted_copy(demo_cfg, tmp_path, caplog):
    check, crm = _check(demo_cfg, tmp_path, list(reversed(TARGET_ROWS)))
    found = {d["external_id"]: d["kind"] for d in check.drift()}
    assert found == {"1001_A2": "stale", "1001_A3": "missing", "1001_GONE_NEW": "extra"}
    assert (check.expected, check.in_target) == (3, 5)
    assert len(crm.statements) == 2 and "order differs" in caplog.text
