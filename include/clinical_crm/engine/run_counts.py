"""Where a run's counts say its records went (the ledger's `runs.counts`).

Per source object: what the run extracted, checked and wrote to the TARGET vault ({object:
{extracted, created, updated, unchanged, quarantined, failed, ...}}). Apart from them, under
PRE_STEP_COUNTS: the pre-step's writes, which go to the SOURCE vault (e.g. the Clinical
Activities a ctms_to_crm run creates in CTMS from monitoring events and communication logs),
{source object: counts}. The page and the demo's table show them apart from the target's Loaded.
"""
from __future__ import annotations

PRE_STEP_COUNTS = "pre_step"
# the pre-step's own counts: how runs recorded before the section are told apart
PRE_STEP_MARKS = ("flagged", "needs_person")


def split(counts: dict | None) -> tuple[dict, dict[str, dict]]:
    """(the counts of the target's side, {source object: the pre-step's counts}). Runs recorded
    before PRE_STEP_COUNTS kept the pre-step's objects beside the others: those carrying its
    marks (PRE_STEP_MARKS) are taken for the pre-step's."""
    counts = dict(counts or {})
    pre = {k: v for k, v in (counts.pop(PRE_STEP_COUNTS, None) or {}).items() if isinstance(v, dict)}
    for key, value in list(counts.items()):
        if isinstance(value, dict) and any(mark in value for mark in PRE_STEP_MARKS):
            pre.setdefault(key, value)
            counts.pop(key)
    return counts, pre
