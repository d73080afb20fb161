"""Smoke test of bench/floor.py at a tiny N: the floor model, the floor script and the pipeline
make the same, formula-given number of API calls. Correctness only: nothing here looks at time
(the figures are bench/RESULTS.md's business)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import floor  # noqa: E402

N = 1000


def floor_formula(n: int) -> int:
    studies = n // 1000 + 1
    sites = 2 * studies
    accounts = max(1, n // 20)
    return (math.ceil(n / 1000)                 # activities, 1,000 a page
            + 1 + 1                             # sites, studies: one statement each (one page here)
            + 3                                 # deletions: activities, studies, sites
            + math.ceil(accounts / 1000)        # accounts by identifier
            + math.ceil(studies / 500) + math.ceil(sites / 500) + math.ceil(n / 500))  # upserts


@pytest.mark.usefixtures("airflow_db")
def test_floor_and_pipeline_make_the_formula_calls(tmp_path):
    result = floor.measure(N, tmp_path / "bench", seed_number=1, now=floor.NOW,
                           airflow_home=Path(os.environ["AIRFLOW_HOME"]), floor_repeats=1)
    f, p = result["floor"], result["pipeline"]
    assert f["model_calls"] == f["server_calls"] == floor_formula(N) == 11
    assert f["interactions_after"] == N and f["auth"] == 2
    assert p["state"] == "success" and p["interactions_after"] == N
    assert p["server_calls"] == f["model_calls"], p["endpoints"]
