"""IdSet: the run's seen ids across staged chunks (dedupe, quarantine closure), exact and compact."""
from __future__ import annotations

import pandas as pd

from clinical_crm.engine.staging import IdSet


def test_ids_seen_in_earlier_chunks_are_found_and_others_not():
    seen = IdSet()
    assert not seen.isin(pd.Series(["V1"], dtype="string")).any()
    for chunk in (["V3", "V1"], ["V7"], ["V5", "V9", "V2"]):
        seen.add(pd.Series(chunk, dtype="string"))
    probe = pd.Series(["V1", "V2", "V4", "V9", "V10", "V"], dtype="string")
    assert seen.isin(probe).tolist() == [True, True, False, True, False, False]
    assert seen.missing(["V4", "V7", "V8"]) == ["V4", "V8"]


def test_many_chunks_merge_and_stay_exact():
    seen = IdSet()
    for k in range(3 * IdSet.MAX_PARTS):
        seen.add([f"V{k:03d}{n:05d}" for n in range(0, 1000, 2)])   # even numbers only
    assert seen.isin([f"V{k:03d}00998" for k in range(3 * IdSet.MAX_PARTS)]).all()
    assert not seen.isin([f"V{k:03d}00999" for k in range(3 * IdSet.MAX_PARTS)]).any()
    # a prefix or an extension of a held id is not that id
    assert seen.isin(["V00000000", "V0000000", "V000000000"]).tolist() == [True, False, False]


def test_ids_of_different_lengths_and_non_ascii():
    seen = IdSet()
    seen.add(["0000A", "B"])
    seen.add(["é-1", "a" * 40])
    assert seen.isin(["B", "0000A", "é-1", "a" * 40, "a" * 39, "é"]).tolist() == [True, True, True, True, False, False]
