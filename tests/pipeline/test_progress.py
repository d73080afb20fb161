"""Progress of long work (issue 20, point 6): `engine.progress` logs records done of total, rate,
elapsed, ETA and the calls left in the burst window at a steady pace (every 30 s, or every 5 %
when sooner); a slow sandbox load logs progress before it ends, and the ledger and the page show
it on the running run's row. Assertions are on log lines and values, never on wall-clock time
(the pace by time is checked with a fake clock)."""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone

import pytest

from clinical_crm.engine import progress as progress_module
from clinical_crm.engine import runner
from clinical_crm.engine.context import RunContext
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.progress import Progress, for_run, line
from clinical_crm.flows.base import SOURCE_ID, Target
from support import INTEGRATION_USER, PASSWORD

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)
ACTIVITY = "crm_activity__v"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_every_five_percent_when_sooner_than_thirty_seconds():
    clock, written = Clock(), []
    p = Progress("load x", total=200, writer=written.append, burst=lambda: 812, clock=clock)
    for _ in range(40):  # 5 records a second: 5 % (10 records) every 2 s
        clock.now += 1
        p.advance(5)
    assert [w["done"] for w in written] == list(range(10, 200, 10))  # 200: the end, for finish()
    last = p.finish()
    assert last["total"] == 200 and last["share"] == 1.0 and last["rate"] == 5.0
    assert last["elapsed_seconds"] == 40.0 and last["eta_seconds"] == 0.0 and last["burst_remaining"] == 812
    middle = written[9]  # 100 of 200 after 20 s: 5/s, 100 left: 20 s
    assert (middle["done"], middle["rate"], middle["eta_seconds"]) == (100, 5.0, 20.0)


def test_every_thirty_seconds_when_five_percent_takes_longer():
    clock, written = Clock(), []
    p = Progress("load x", total=10_000, writer=written.append, clock=clock)
    for _ in range(100):  # 1 record a second: 5 % would take 500 s
        clock.now += 1
        p.advance(1)
    assert [w["done"] for w in written] == [30, 60, 90]
    assert written[0]["eta_seconds"] == pytest.approx((10_000 - 30) / 1.0)


def test_an_unknown_total_is_reported_by_time_and_can_grow():
    clock, written = Clock(), []
    p = Progress("extract x", writer=written.append, clock=clock)
    clock.now += 31
    p.advance(7)
    assert written[-1]["total"] is None and written[-1]["eta_seconds"] is None and written[-1]["share"] is None
    assert "7 records" in line(written[-1]) and "ETA unknown" in line(written[-1])
    p.add_total(100)  # a query's first page says how many it matches
    p.add_total(None)
    clock.now += 1
    p.advance(10)  # 10 more: over 5 % of 100
    assert written[-1]["total"] == 100 and written[-1]["done"] == 17
    final = p.finish()
    assert final["state"] == "done" and written[-1] == final


def test_the_line_says_done_of_total_rate_elapsed_eta_and_burst():
    text = line({"what": "load crm_activity__v", "done": 1200, "total": 5000, "share": 0.24, "rate": 40.0,
                 "elapsed_seconds": 30, "eta_seconds": 95, "burst_remaining": 812, "state": "running"})
    assert text == ("load crm_activity__v: 1200 of 5000 records (24%), 40.0/s, elapsed 30 s, ETA 1 min 35 s, "
                    "812 calls left in the burst window")


def test_the_ledger_keeps_each_steps_latest_progress(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    run_id = ledger.start_run("demo", "ctms_to_crm", "manual", T0, T0)
    assert ledger.progress(run_id) == {} and ledger.run(run_id)["progress"] == {}
    write = for_run(ledger, run_id)
    write({"what": "extract a", "done": 1})
    write({"what": "load b", "done": 2})
    write({"what": "extract a", "done": 3})
    assert ledger.progress(run_id) == {"extract a": {"what": "extract a", "done": 3},
                                       "load b": {"what": "load b", "done": 2}}
    ledger.set_progress(run_id, "load b", None)
    assert list(ledger.run(run_id)["progress"]) == ["extract a"]
    ledger.start_run("demo", "ctms_to_crm", "manual", T0, T0)  # a retried first task starts over
    assert ledger.progress(run_id) == {}
    assert for_run(ledger, None) is None


def test_a_failing_ledger_never_fails_the_work(caplog):
    class Broken:
        def set_progress(self, *args):
            raise RuntimeError("database is locked")

    with caplog.at_level(logging.WARNING):
        for_run(Broken(), 7)({"what": "load x", "done": 1})
    assert "could not record the progress of run 7" in caplog.text


# ---------------------------------------------------------------- a slow sandbox load


@pytest.fixture(scope="module")
def slow_ctms(tmp_path_factory):
    from vault_sandbox.testing import SandboxServer

    folder = tmp_path_factory.mktemp("slow_ctms")
    profile = folder / "latency.yaml"
    profile.write_text("write_ms: 20\nwrite_per_record_ms: 1\nquery_ms: 10\njitter: 0\n")
    with SandboxServer("ctms", folder / "ctms.db", seed="demo", latency=profile) as server:
        yield server


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def activity(i: int) -> dict:
    return {SOURCE_ID: f"S{i:04d}", "object_type__vr.api_name__v": "medical_activity__v",
            "external_id__v": f"PROGRESS-{i:04d}", "subject__v": f"Call {i}", "channel__v": "phone__v",
            "activity_date__v": "2026-01-05"}


def test_a_slow_sandbox_load_logs_progress_before_it_ends_and_the_page_shows_it(
        slow_ctms, tmp_path, demo_cfg, monkeypatch):
    from fastapi.testclient import TestClient

    from clinical_crm.airflow import plugin
    from clinical_crm.vault.client import VaultClient

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", url)
    monkeypatch.setattr(plugin, "_ledger", lambda: Ledger(url))
    ledger = Ledger(url)
    run_id = ledger.start_run("demo", "ctms_to_crm", "manual__progress", T0, T0)
    ctx = RunContext("demo", "ctms_to_crm", "manual__progress", T0.isoformat(), T0.isoformat(), True,
                     str(tmp_path), run_id)
    cfg = demo_cfg.model_copy(update={"load": demo_cfg.load.model_copy(update={"concurrency": 1, "batch_size": 5})})
    spec = Target("activities", "activities", ACTIVITY, ACTIVITY, "external_id__v", build=lambda rows: [])

    # what the ledger and the page held while the load was still going (seen from its writer)
    during: list[tuple[dict, str]] = []
    page = TestClient(plugin.create_app(require_airflow_login=False))
    set_progress = ledger.set_progress

    def watched(run, key, figures):
        set_progress(run, key, figures)
        if figures and figures["state"] == "running" and not during:
            during.append((ledger.run(run)["progress"], page.get("/").text))

    monkeypatch.setattr(ledger, "set_progress", watched)
    client = VaultClient(slow_ctms.url, INTEGRATION_USER, PASSWORD)
    seen = Lines()
    logger = logging.getLogger("clinical_crm.engine.runner")  # Airflow's logging set-up may bypass caplog
    level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)
    try:
        totals = runner._write(ledger, ctx, client, cfg, spec, [[activity(i) for i in range(100)]], total=100)
    finally:
        client.close()
        logger.removeHandler(seen)
        logger.setLevel(level)
    assert totals["created"] + totals["updated"] == 100, totals

    lines = [text for text in seen.lines if text.startswith("progress load crm_activity__v")]
    done = [int(m.group(1)) for m in (re.search(r": (\d+) of 100 records", text) for text in lines) if m]
    # a line every 5 % (5 records: one batch) before the end, then the final line
    assert done == [*range(5, 100, 5), 100], lines
    assert "ETA" in lines[0] and "/s" in lines[0] and "elapsed" in lines[0]
    assert re.search(r"\d+ calls left in the burst window", lines[0]), lines[0]
    assert lines[-1].endswith("calls left in the burst window") and ", done," in lines[-1]

    assert during, "the ledger was never written while the load was running"
    held, html = during[0]
    figures = held["load crm_activity__v"]
    assert figures["state"] == "running" and figures["total"] == 100 and 0 < figures["done"] < 100
    assert figures["burst_remaining"] is not None and figures["rate"] > 0
    row = html.split('data-dag-run-id="manual__progress"')[1].split("</tr>")[0]
    shown = re.search(r'class="progress progress-running" data-step="load crm_activity__v" '
                      r'data-done="(\d+)" data-total="100"', row)
    assert shown and 0 < int(shown.group(1)) < 100, row
    assert f"{figures['done']} of 100 records" in row

    final = ledger.progress(run_id)["load crm_activity__v"]
    assert final["state"] == "done" and final["done"] == 100  # kept as final


def test_the_extraction_counts_against_the_querys_total(tmp_path):
    """A read's progress takes its total from the first page's responseDetails.total."""
    from clinical_crm.engine import extract
    from clinical_crm.vault.responses import QueryPage

    class Pages:
        burst_remaining = 40

        def query(self, query):
            for n in (4, 4, 2):
                yield QueryPage([{"id": f"x{i}"} for i in range(n)], ["id"], (), 10)

    clock, written = Clock(), []
    p = Progress("extract x", writer=written.append, clock=clock, burst=lambda: 40)
    frames = list(extract.frames(Pages(), ["SELECT id FROM x"], p))
    assert sum(len(f) for f in frames) == 10
    p.finish()
    assert [(w["done"], w["total"], w["state"]) for w in written] == [(4, 10, "running"), (8, 10, "running"),
                                                                     (10, 10, "done")]
    assert written[-1]["burst_remaining"] == 40


def test_progress_clock_is_injectable_for_the_reconciliation():
    """The API another step (the reconciliation) calls: no ledger needed, any writer, any clock."""
    assert progress_module.EVERY_SECONDS == 30 and progress_module.EVERY_SHARE == 0.05
    clock = Clock()
    p = Progress("reconcile x", total=3, clock=clock, unit="records compared")
    p.advance(3)
    assert p.figures()["done"] == 3 and "3 of 3 records compared" in line(p.figures())
