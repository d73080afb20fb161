"""The outcome vocabulary and a record's result (clinical_crm.outcomes)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clinical_crm import outcomes
from clinical_crm.outcomes import CLEARED_ON_RETRY, LOAD_OUTCOMES, LOADED, Outcome, RecordResult


def test_a_record_result_round_trips_through_its_dict():
    result = RecordResult("V1", Outcome.FAILED, target_id=None, external_id="1001_V1",
                          error_type="INVALID_DATA", message="bad channel")
    as_dict = result.as_dict()
    assert as_dict == {"source_id": "V1", "outcome": "failed", "target_id": None, "external_id": "1001_V1",
                       "error_type": "INVALID_DATA", "message": "bad channel"}
    assert type(as_dict["outcome"]) is str  # plain text: XCom, JSON and the ledger take it as it is
    assert RecordResult.from_dict(as_dict) == result


def test_from_dict_takes_the_dicts_the_code_passes_today():
    row = {"source_id": 7, "outcome": "created", "target_id": "CI1", "warnings": ["x"], "index": 0}
    result = RecordResult.from_dict(row)
    assert result == RecordResult("7", Outcome.CREATED, target_id="CI1")
    assert result.outcome is Outcome.CREATED and result.source_id == "7"
    with pytest.raises(ValueError):
        RecordResult("V1", "made_up")
    with pytest.raises(AttributeError):  # frozen
        result.outcome = Outcome.FAILED


def test_outcomes_are_their_text():
    assert Outcome.MARKED_DELETED == "marked_deleted" and f"{Outcome.NEEDS_PERSON}" == "needs_person"
    assert {"created": 1}[Outcome.CREATED] == 1
    assert len({o.value for o in Outcome}) == len(Outcome) == 10


def test_groupings():
    assert LOADED == ("created", "updated", "unchanged") and set(LOADED) <= set(LOAD_OUTCOMES)
    assert set(LOAD_OUTCOMES) - set(CLEARED_ON_RETRY) == {Outcome.MARKED_DELETED}


def test_a_rules_layer_module_imports_nothing_from_the_engine():
    tree = ast.parse(Path(outcomes.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("clinical_crm")]
