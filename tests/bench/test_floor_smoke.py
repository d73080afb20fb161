"""Smoke test of bench/floor.py at a tiny N: the floor model, the floor scripts (sequential and
parallel) and the pipeline make the same, formula-given number of API calls. Correctness only:
nothing here looks at time (the figures are bench/RESULTS.md's business)."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import floor  # noqa: E402

N = 1000
RATIOS = re.compile(r"^RATIOS N=(\d+) latency=(\S+) concurrency=(\d+): calls \d+\.\d{3} x floor; "
                    r"wall \d+\.\d{2} x parallel floor; wall \d+\.\d{2} x sequential floor; "
                    r"burst-delayed calls (\d+)$")
BURST = re.compile(r"^BURST N=(\d+) limit=(\d+)/(\S+)s: calls (\d+); wall \d+\.\d{2} s; "
                   r"bound calls/limit\*window (\d+\.\d{2}) s; wall/bound \d+\.\d{2}; burst-delayed calls (\d+)$")


def floor_formula(n: int) -> int:
    studies = n // 1000 + 1
    sites = 2 * studies
    accounts = max(1, n // 20)
    return (math.ceil(n / 1000)                 # activities, 1,000 a page
            + 1 + 1                             # sites, studies: one statement each (one page here)
            + 3                                 # deletions: activities, studies, sites
            + math.ceil(accounts / 1000)        # accounts by identifier
            + math.ceil(studies / 500) + math.ceil(sites / 500) + math.ceil(n / 500))  # upserts


def assert_floors_make_the_model_calls(result: dict, concurrency: int) -> None:
    f, pf = result["floor"], result["parallel_floor"]
    assert f["model_calls"] == f["server_calls"] == floor_formula(N) == 11
    assert f["interactions_after"] == N and f["auth"] == 2
    # the parallel floor: the same calls, endpoint by endpoint, never more than C in flight
    assert pf["server_calls"] == pf["client_calls"] == f["model_calls"]
    assert pf["endpoints"] == f["endpoints"], (pf["endpoints"], f["endpoints"])
    assert pf["auth"] == 2 and pf["interactions_after"] == N
    assert 1 <= pf["peak_in_flight"] <= pf["concurrency"] == concurrency


@pytest.mark.usefixtures("airflow_db")
def test_floor_and_pipeline_make_the_formula_calls(tmp_path):
    result = floor.measure(N, tmp_path / "bench", seed_number=1, now=floor.NOW,
                           airflow_home=Path(os.environ["AIRFLOW_HOME"]), floor_repeats=1)
    assert_floors_make_the_model_calls(result, concurrency=4)
    f, p = result["floor"], result["pipeline"]
    assert p["state"] == "success" and p["interactions_after"] == N
    assert p["server_calls"] == f["model_calls"], p["endpoints"]
    assert p["delayed"] == 0 and "burst" not in result
    [line] = floor.summary([result])
    assert RATIOS.match(line).groups() == (str(N), "none", "4", "0"), line


@pytest.fixture(scope="module")
def with_latency(tmp_path_factory, airflow_db):
    """One run with a 20 ms latency profile, concurrency 3 and a (generous) pipeline burst limit."""
    folder = tmp_path_factory.mktemp("bench_latency")
    profile = folder / "latency.yaml"
    profile.write_text("auth_ms: 20\nquery_ms: 20\nquery_page_ms: 20\nwrite_ms: 20\ndeletions_ms: 20\n"
                       "metadata_ms: 20\njitter: 0.25\n")
    setup = floor.Setup(latency=str(profile), latency_seed=1, concurrency=3, burst_limit=10_000,
                        burst_window_seconds=60)
    return floor.measure(N, folder / "bench", seed_number=1, now=floor.NOW, airflow_home=airflow_db,
                         floor_repeats=2, setup=setup)


def test_with_latency_the_floors_and_pipeline_make_the_model_calls(with_latency):
    result = with_latency
    assert_floors_make_the_model_calls(result, concurrency=3)
    assert len(result["floor"]["seconds_runs"]) == len(result["parallel_floor"]["seconds_runs"]) == 2
    p = result["pipeline"]
    assert p["state"] == "success" and p["interactions_after"] == N
    assert p["server_calls"] == result["floor"]["model_calls"], p["endpoints"]
    assert result["setup"]["latency"].endswith("latency.yaml") and result["setup"]["concurrency"] == 3


def test_summary_lines_with_a_burst_limit(with_latency):
    burst, ratios = floor.summary([with_latency])
    calls, delayed = with_latency["pipeline"]["server_calls"], with_latency["pipeline"]["delayed"]
    assert BURST.match(burst).groups() == (str(N), "10000", "60", str(calls), f"{calls / 10_000 * 60:.2f}",
                                           str(delayed)), burst
    assert RATIOS.match(ratios).groups()[1:] == (with_latency["setup"]["latency"], "3", str(delayed)), ratios
    assert with_latency["burst"]["burst_floor"] == 5      # max(2, C + 2)


def test_setup_gives_latency_to_every_phase_and_the_burst_limit_to_the_pipeline_only():
    setup = floor.Setup(latency="vault", latency_seed=7, concurrency=6, burst_limit=150, burst_window_seconds=60)
    assert setup.server_options() == {"burst_limit": floor.BURST, "latency": "vault", "latency_seed": 7}
    assert setup.server_options(pipeline=True) == {"burst_limit": 150, "burst_window_seconds": 60,
                                                   "latency": "vault", "latency_seed": 7}
    assert setup.connection_extras() == {"burst_floor": 8, "burst_window_seconds": 60}
    assert floor.Setup().server_options(pipeline=True) == {"burst_limit": floor.BURST}
    assert floor.Setup().connection_extras() == {}
    assert floor.Setup(concurrency=1, burst_limit=10).burst_floor == 3


def test_main_ends_with_a_ratios_line_per_n_and_records_the_output(with_latency, tmp_path, monkeypatch, capsys):
    """The command line around measure(): the closing lines and the JSON (measure itself is stubbed
    with the fixture's result, so nothing is run twice)."""
    seen = []

    def fake_measure(n, workdir, seed_number, now, airflow_home, skip_pipeline, profile, floor_repeats,
                     pipeline_only, setup):
        seen.append((n, floor_repeats, setup))
        r = copy.deepcopy(with_latency)
        r["n"], r["setup"] = n, floor.asdict(setup)
        r["burst"].update(limit=setup.burst_limit, window_seconds=setup.window_seconds)
        return r

    monkeypatch.setattr(floor, "measure", fake_measure)
    monkeypatch.setattr(floor, "migrate", lambda *a, **kw: None)
    out = tmp_path / "out.json"
    assert floor.main(["--n", "1000", "--n", "2000", "--latency", "vault", "--concurrency", "3",
                       "--burst-limit", "150", "--burst-window-seconds", "60", "--workdir", str(tmp_path / "w"),
                       "--json", str(out)]) == 0
    assert [(n, repeats, s.concurrency, s.latency, s.burst_limit) for n, repeats, s in seen] == [
        (1000, 1, 3, "vault", 150), (2000, 1, 3, "vault", 150)]     # one floor run each with latency
    lines = capsys.readouterr().out.splitlines()
    assert [RATIOS.match(x).group(1, 2, 3) for x in lines[-2:]] == [("1000", "vault", "3"), ("2000", "vault", "3")]
    assert [BURST.match(x).group(1, 2, 3) for x in lines[-4:-2]] == [("1000", "150", "60"), ("2000", "150", "60")]
    recorded = json.loads(out.read_text())
    assert recorded["output"] == lines and recorded["summary"] == lines[-4:]
    assert recorded["floor_repeats"] == 1 and recorded["setup"]["burst_limit"] == 150


def test_bad_options_stop_before_anything_runs(tmp_path, capsys):
    for argv in (["--latency", str(tmp_path / "missing.yaml")], ["--concurrency", "0"],
                 ["--burst-window-seconds", "60"]):
        with pytest.raises(SystemExit) as stop:
            floor.main(argv)
        assert stop.value.code == 2
