"""Faults: both vaults inject faults at a 10% rate (every kind, plus burst-limit delays) while
both DAGs move N records each way, then 10% of each side are deleted and 10% updated and a second
window sends those (faults still on); afterwards both vaults hold exactly what a fault-free run
over an identical copy of the seeded databases produces, deletion marks and inactivations
included, and the ledger agrees with the vaults. The full-size run (N=10,000) is
scripts/fault_run.py; CI runs N=1,000 here.
"""
from __future__ import annotations

import json

import pytest

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.fixture(scope="module")
def small_seed(tmp_path_factory, airflow_db):
    return harness.seed_world(tmp_path_factory.mktemp("seed"), 60)


@pytest.mark.slow
def test_fault_run_ends_exactly_like_a_fault_free_run(tmp_path, capsys):
    report = harness.fault_run(tmp_path, n=1000, rate=0.10, fault_seed=11, batch_size=100, page_size=200,
                               burst_limit=10, burst_window_seconds=10, burst_delay_ms=100, slow_seconds=0.5,
                               log=lambda *_: None)
    (tmp_path / "report.json").write_text(json.dumps(report, indent=1, default=str))
    with capsys.disabled():
        print("\n[fault run] " + "\n[fault run] ".join(harness.summary_lines(report)))
    for name in ("reference", "faults"):
        assert all(r["state"] == "success" for r in report[name]["dag_runs"].values()), report[name]["dag_runs"]
    assert report["reference"]["faults_injected"] == {}
    injected = report["faults"]["faults_injected"]
    assert set(injected) == set(harness.ALL_FAULTS), injected  # every kind happened
    client = report["faults"]["client"]
    assert client.get("paced", 0) + client.get("delayed_responses", 0) > 0  # the burst limit bit
    assert report["faults"]["client"]["retry"] > 0 and report["faults"]["client"]["race_retry"] > 0
    assert report["missing"] == 0 and report["extra"] == 0, {
        app: {t: r for t, r in c.items() if r["missing"] or r["extra"]} for app, c in report["comparison"].items()}
    # the ledger says what each record's first run did, faults or not: every record created once
    first = {r["direction"]: r["counts"] for r in report["faults"]["ledger"][-2:]}
    activities = first["ctms_to_crm"]["crm_activity__v"]
    assert (activities["created"], activities["unchanged"]) == (1000, 0)
    assert (first["crm_to_ctms"]["call2__v"]["created"], first["crm_to_ctms"]["call2__v"]["unchanged"]) == (1000, 0)
    written = report["records_written_by_runs"]
    changed = report["faults"]["changed"]
    assert changed == {"crm_activity__v": {"deleted": 100, "updated": 100},
                       "call2__v": {"deleted": 100, "updated": 100}}
    assert written["crm"]["clinical_interaction__v"] == 1000  # deleted activities: marked, never removed
    assert written["ctms"]["crm_activity__v"] == 1900  # 1,000 Clinical (100 deleted) + 1,000 Medical Activities
    # the ledger agrees with the vaults: every mapped target exists, every applied mark is there
    agreement = report["faults"]["ledger_against_vault"]
    assert agreement["deletions_applied"] == 200 and agreement["deletions_pending"] == 0, agreement
    assert agreement["mapped_missing_in_vault"] == agreement["applied_without_mark_in_vault"] == 0, agreement


def test_a_record_that_keeps_racing_is_not_lost(small_seed, tmp_path, monkeypatch):
    """A record refused with RACE_CONDITION more often than the client re-sends it must not end
    as a silent per-record failure of a successful run: the load task fails and is retried, and
    the record arrives."""
    import functools

    from clinical_crm.airflow import hooks
    from clinical_crm.vault.client import VaultClient

    folder = harness.copy_world(small_seed, tmp_path / "w")
    # the hook's clients with short pauses between race re-sends (1, 2, 4, 8, 16 s by default)
    monkeypatch.setattr(hooks, "VaultClient", functools.partial(VaultClient, backoff_initial=0.01))
    with harness.World(folder) as world, harness.client_counters() as clients:
        world.arm()
        # the first write call: its first record races 6 times (the client re-sends it 5 times)
        world.ctms.admin.faults(queue=["race_condition"] * 6)
        dr = world.run_dag("crm_to_ctms__demo", harness.wide_window())
        tries = {ti.task_id: ti.try_number for ti in dr.get_task_instances()}
        counters = world.disarm()
        outcomes = world.ledger().recent_runs("demo", limit=1)[0]
    assert counters["ctms"]["faults"] == {"race_condition": 6}
    assert clients["race_retry"] == 5
    assert dr.state == "success", outcomes
    assert tries["load"] == 2  # the task was retried, and the retry wrote the record
    counts = outcomes["counts"]["call2__v"]  # the retry's counts, not the failed attempt's
    assert counts["failed"] == counts["transient_failed"] == 0 and counts["loaded"] == 60, counts
    snap = harness.snapshot(folder / "ctms.db")
    medical = [json.loads(r) for r in snap["crm_activity__v"] if '"external_id__v": "2002_' in r]
    assert len(medical) == 60


def test_a_retried_load_keeps_the_outcome_of_the_attempt_that_wrote_each_record(small_seed, tmp_path, monkeypatch):
    """Issue 14, finding 3: the first attempt creates 59 Medical Activities and loses one record to
    RACE_CONDITION; the retry finds the 59 unchanged and creates the last one. The ledger says what
    happened: 60 created by this run, one outcome per record, counts that do not mix attempts."""
    import functools

    from clinical_crm.airflow import hooks
    from clinical_crm.vault.client import VaultClient

    folder = harness.copy_world(small_seed, tmp_path / "w")
    monkeypatch.setattr(hooks, "VaultClient", functools.partial(VaultClient, backoff_initial=0.01))
    with harness.World(folder) as world:
        world.arm()
        world.ctms.admin.faults(queue=["race_condition"] * 6)
        dr = world.run_dag("crm_to_ctms__demo", harness.wide_window())
        world.disarm()
        run, outcomes = world.last_run("SELECT source_id, outcome FROM record_outcomes WHERE run_id = :run "
                                       "AND object = 'call2__v'")
    assert dr.state == "success"
    assert {ti.task_id: ti.try_number for ti in dr.get_task_instances()}["load"] == 2
    assert len(outcomes) == len({s for s, _ in outcomes}) == 60  # one outcome per record
    assert {o for _, o in outcomes} == {"created"}, sorted(set(outcomes))[:5]
    counts = run["counts"]["call2__v"]
    assert (counts["created"], counts["unchanged"], counts["loaded"], counts["failed"]) == (60, 0, 60, 0), counts
