"""The load keeps `load.concurrency` write calls in flight and keeps every guarantee: one outcome
per record, the version guard before each send, and, when a write fails, the answers of the
calls still in flight recorded before the error goes up (issue 12)."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pandas as pd
import pytest

from clinical_crm.engine import load, runner, staging
from clinical_crm.engine.context import RunContext
from clinical_crm.engine.ledger import Ledger
from clinical_crm.flows import ctms_to_crm
from clinical_crm.vault import RecordOutcome
from clinical_crm.vault.errors import VaultTransientError

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
OBJ = "crm_activity__v"  # the source object of clinical interactions


class SlowVault:
    """Answers each upsert after `seconds`, noting how many calls were in flight at once; a call
    holding the external id `lose` gets no answer (a transient fault, as a timeout)."""

    def __init__(self, seconds: float = 0.03, lose: str | None = None):
        self.seconds, self.lose = seconds, lose
        self.lock = threading.Lock()
        self.in_flight = self.most_in_flight = 0
        self.calls: list[list[str]] = []

    def retrying(self):
        import tenacity

        return tenacity.Retrying(stop=tenacity.stop_after_attempt(1), reraise=True)

    def upsert(self, object_name, records, id_param, batch_size=500, retry=True):
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.calls.append([r[id_param] for r in records])
        try:
            time.sleep(self.seconds)
            if self.lose in {r[id_param] for r in records}:
                raise VaultTransientError("TIMEOUT", "POST vobjects: ReadTimeout")
            return [RecordOutcome(i, f"T{r[id_param]}", "created") for i, r in enumerate(records)]
        finally:
            with self.lock:
                self.in_flight -= 1


def config(demo_cfg, concurrency: int, batch_size: int = 10):
    return demo_cfg.model_copy(update={"load": demo_cfg.load.model_copy(
        update={"concurrency": concurrency, "batch_size": batch_size})})


def staged_records(tmp_path, n: int) -> str:
    rows = [{"_source_id": f"S{i:04d}", "_source_version": "2026-11-25T09:00:00.000Z",
             "external_id__v": f"1001_S{i:04d}", "subject__v": f"visit {i}"} for i in range(n)]
    return staging.write_frames(f"file://{tmp_path}/clinical_interactions.records.parquet", [pd.DataFrame(rows)]).path


@pytest.fixture
def setup(tmp_path, demo_cfg):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    run = RunContext("demo", "ctms_to_crm", "manual", T0.isoformat(), T0.isoformat(), True, str(tmp_path),
                     ledger.start_run("demo", "ctms_to_crm", "manual", T0, T0))
    interactions = next(t for t in ctms_to_crm.build(demo_cfg).targets if t.records == "clinical_interactions")
    return ledger, run, interactions


def outcomes_of(ledger: Ledger, run_id: int) -> list[tuple[str, str]]:
    with ledger.engine.connect() as db:
        from sqlalchemy import text

        return [tuple(r) for r in db.execute(text("SELECT source_id, outcome FROM record_outcomes WHERE run_id = :r"),
                                             {"r": run_id})]


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_load_keeps_its_concurrency_of_write_calls_in_flight(setup, tmp_path, demo_cfg, concurrency):
    ledger, run, interactions = setup
    vault = SlowVault()
    totals = runner._load_target(ledger, run, vault, config(demo_cfg, concurrency), interactions,
                                 staged_records(tmp_path, 300))
    assert vault.most_in_flight == concurrency
    assert len(vault.calls) == 30 and all(len(c) == 10 for c in vault.calls)
    assert sorted(i for c in vault.calls for i in c) == [f"1001_S{i:04d}" for i in range(300)]  # each record once
    assert totals["created"] == totals["loaded"] == 300
    outcomes = outcomes_of(ledger, run.run_id)
    assert len(outcomes) == len({s for s, _ in outcomes}) == 300 and {o for _, o in outcomes} == {"created"}
    assert len(ledger.loaded_versions("demo", "ctms_to_crm", OBJ, [f"S{i:04d}" for i in range(300)])) == 300


def test_a_write_without_an_answer_leaves_every_answer_in_flight_in_the_ledger(setup, tmp_path, demo_cfg):
    """The 12th call gets no answer while others are in flight: the load fails (to be retried),
    but first the ledger holds `unknown` for that call's records and the outcome of every record
    the other calls wrote; nothing is recorded twice and nothing sent goes unrecorded."""
    ledger, run, interactions = setup
    vault = SlowVault(lose="1001_S0115")
    with pytest.raises(load.WriteUncertain):
        runner._load_target(ledger, run, vault, config(demo_cfg, 4), interactions, staged_records(tmp_path, 300))
    sent = {i.removeprefix("1001_") for c in vault.calls for i in c}
    outcomes = dict(outcomes_of(ledger, run.run_id))
    assert len(outcomes_of(ledger, run.run_id)) == len(outcomes)  # one outcome per record
    assert set(outcomes) == sent  # every record sent has its outcome, no other
    lost = {f"S{i:04d}" for i in range(110, 120)}
    assert {s for s, o in outcomes.items() if o == "unknown"} == lost
    assert {o for s, o in outcomes.items() if s not in lost} == {"created"}
    assert len(sent) > 120  # calls after the lost one were in flight and answered


def test_deletion_marks_update_concurrency_calls_at_once_and_keep_the_order():
    vault = SlowVault()
    updates: list[list[str]] = []

    def update(object_name, records, batch_size=500):
        with vault.lock:
            vault.in_flight += 1
            vault.most_in_flight = max(vault.most_in_flight, vault.in_flight)
            updates.append([r["id"] for r in records])
        time.sleep(vault.seconds)
        with vault.lock:
            vault.in_flight -= 1
        return [RecordOutcome(i, r["id"], "updated") for i, r in enumerate(records)]

    vault.update = update
    records = [{"id": f"T{i:03d}", "subject__v": "x Deleted"} for i in range(95)]
    outcomes = load.update(vault, "clinical_interaction__v", records, batch_size=10, concurrency=3)
    assert [o["source_id"] for o in outcomes] == [r["id"] for r in records]
    assert {o["outcome"] for o in outcomes} == {"updated"} and len(updates) == 10 and vault.most_in_flight == 3


def test_after_a_failed_write_the_batches_not_yet_sent_are_not_sent(setup, tmp_path, demo_cfg):
    """Concurrency 1: the second batch waits in the queue while the first call fails; it is
    cancelled, not sent after the error is known (nothing is sent that nobody will record)."""
    ledger, run, interactions = setup
    vault = SlowVault(seconds=0.05, lose="1001_S0003")
    with pytest.raises(load.WriteUncertain):
        runner._load_target(ledger, run, vault, config(demo_cfg, 1), interactions, staged_records(tmp_path, 40))
    assert len(vault.calls) == 1
    assert {o for _, o in outcomes_of(ledger, run.run_id)} == {"unknown"}
