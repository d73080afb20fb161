"""Both DAGs, four calls in flight, against vaults with a small burst limit: the clients wait for
the next window instead of passing the limit, so the vaults delay no call, and everything arrives
(issue 12: "zero calls delayed by the vault")."""
from __future__ import annotations

import pytest

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")
N = 300
LIMIT, WINDOW_SECONDS = 14, 3


def test_runs_wait_for_the_next_burst_window_instead_of_being_delayed(tmp_path):
    seed = harness.seed_world(tmp_path / "seed", N)
    folder = harness.copy_world(seed, tmp_path / "w")
    with harness.World(folder, batch_size=50, concurrency=4, server_options={"page_size": 100},
                       limits={"burst_limit": LIMIT, "burst_window_seconds": WINDOW_SECONDS, "burst_delay_ms": 300},
                       conn_extra={"burst_floor": 4, "burst_window_seconds": WINDOW_SECONDS}) as world, \
            harness.client_counters() as clients:
        world.arm()
        states = world.run_both(harness.wide_window())
        counters = world.disarm()
    assert {dag: state for dag, (state, _) in states.items()} == {dag: "success" for dag in harness.DAGS}
    calls = {app: c["total"] for app, c in counters.items()}
    assert min(calls.values()) > LIMIT  # each vault got more calls than one window allows ...
    assert {app: c["delayed"] for app, c in counters.items()} == {"ctms": 0, "crm": 0}  # ... none delayed
    assert clients["paced"] >= 1 and clients["delayed_responses"] == 0  # (how many waits: the clock decides)
    snap = {app: harness.snapshot(folder / f"{app}.db") for app in ("ctms", "crm")}
    assert sum(snap["crm"]["clinical_interaction__v"].values()) == N
    assert sum(n for row, n in snap["ctms"]["crm_activity__v"].items() if '"external_id__v": "2002_' in row) == N
