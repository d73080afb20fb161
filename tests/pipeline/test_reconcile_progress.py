"""Progress of a reconciliation (issue 20, point 6; engine/reconcile.py, engine/progress.py): against
two slow sandbox vaults (demo seed, a latency profile, pages and write batches of 5), its reads,
validation, comparison and repair log progress lines (done of total, rate, elapsed, ETA, calls
left in the burst window) while they run, before the run ends; the reconciliation's ledger row
holds the latest figures while it runs and the page shows them under "Reconciliation".

One story, in order: nothing was sent, so a reconcile with repair finds every valid activity
missing and writes it (repair lines); a reconcile without repair then reads those interactions
back page by page (compare lines) and finds no drift. Assertions are on log lines and values,
never on wall-clock time."""
from __future__ import annotations

import logging
import re
import threading

import pytest

from clinical_crm.engine import reconcile
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.progress import for_reconcile_run
from clinical_crm.flows import build
from support import INTEGRATION_USER, PASSWORD

INTERACTION = "clinical_interaction__v"


def test_the_reconciliations_row_keeps_each_steps_latest_progress(tmp_path, caplog):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    run_id = ledger.start_reconcile("demo", "ctms_to_crm", "manual", repair=False)
    assert ledger.reconcile_progress(run_id) == {} and ledger.reconcile_runs("demo")[0]["progress"] == {}
    write = for_reconcile_run(ledger, run_id)
    write({"what": "extract a", "done": 1})
    write({"what": "compare b", "done": 2})
    write({"what": "extract a", "done": 3})
    assert ledger.reconcile_progress(run_id) == {"extract a": {"what": "extract a", "done": 3},
                                                 "compare b": {"what": "compare b", "done": 2}}
    ledger.set_reconcile_progress(run_id, "compare b", None)
    assert list(ledger.reconcile_runs("demo")[0]["progress"]) == ["extract a"]
    ledger.finish_reconcile(run_id, "success", {})
    assert ledger.reconcile_progress(run_id) == {"extract a": {"what": "extract a", "done": 3}}  # kept
    assert for_reconcile_run(ledger, None) is None

    class Broken:
        def set_reconcile_progress(self, *args):
            raise RuntimeError("database is locked")

    with caplog.at_level(logging.WARNING):
        for_reconcile_run(Broken(), 7)({"what": "compare x", "done": 1})  # never fails the reconciliation
    assert "could not record the progress of reconciliation run 7" in caplog.text


@pytest.fixture(scope="module")
def slow_vaults(tmp_path_factory):
    from vault_sandbox.testing import SandboxServer

    from clinical_crm.vault.client import VaultClient

    folder = tmp_path_factory.mktemp("slow_reconcile")
    profile = folder / "latency.yaml"
    profile.write_text("write_ms: 20\nwrite_per_record_ms: 1\nquery_ms: 10\njitter: 0\n")
    with SandboxServer("ctms", folder / "ctms.db", seed="demo", latency=profile) as ctms_server, \
            SandboxServer("crm", folder / "crm.db", seed="demo", latency=profile) as crm_server, \
            VaultClient(ctms_server.url, INTEGRATION_USER, PASSWORD) as ctms, \
            VaultClient(crm_server.url, INTEGRATION_USER, PASSWORD) as crm:
        yield {"ctms": ctms, "crm": crm}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def story(slow_vaults, tmp_path_factory, demo_cfg, monkeypatch):
    """Run a reconciliation of ctms_to_crm; returns (summary, log lines, what the ledger and the
    page held the first time each step wrote running figures)."""
    from fastapi.testclient import TestClient

    from clinical_crm.airflow import plugin

    data = tmp_path_factory.getbasetemp() / "slow_reconcile_data"
    data.mkdir(exist_ok=True)
    url = f"sqlite:///{data / 'ledger.db'}"
    monkeypatch.setenv("CLINICAL_CRM_DATA_DIR", str(data))
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", url)
    monkeypatch.setattr(plugin, "_ledger", lambda: Ledger(url))
    monkeypatch.setattr(reconcile, "VALIDATE_ROWS", 16)  # the demo's activities validated in blocks
    monkeypatch.setattr(reconcile.TargetCheck, "RESEND_BATCHES", 1)  # a progress step per write batch
    cfg = demo_cfg.model_copy(update={"load": demo_cfg.load.model_copy(
        update={"concurrency": 1, "batch_size": 5, "query_page_size": 5})})
    flow = build("ctms_to_crm", cfg)
    ledger = Ledger(url)
    if not ledger.connections():  # the page lists the connections that have runs
        ledger.finish_run(ledger.start_run(cfg.name, "ctms_to_crm", "manual__earlier", None, None), "success")
    page = TestClient(plugin.create_app(require_airflow_login=False))

    during: dict[str, tuple[dict, str]] = {}  # step -> (the run's progress in the ledger, the page's html)
    set_progress = ledger.set_reconcile_progress
    one_at_a_time = threading.Lock()  # the reads report from several threads

    def watched(run_id, key, figures):
        set_progress(run_id, key, figures)
        with one_at_a_time:
            if not figures or figures["state"] != "running" or key in during:
                return
            row = ledger.reconcile_runs(cfg.name, limit=1)[0]
            during[key] = (row | {"progress": ledger.reconcile_progress(run_id)}, page.get("/").text)

    monkeypatch.setattr(ledger, "set_reconcile_progress", watched)
    seen = Lines()
    logger = logging.getLogger("clinical_crm.engine")  # Airflow's logging set-up may bypass caplog
    level = logger.level
    logger.addHandler(seen)
    logger.setLevel(logging.INFO)

    def run(repair: bool):
        seen.lines.clear()
        during.clear()
        summary = reconcile.reconcile(flow, cfg, slow_vaults, f"manual__progress_{repair}", repair=repair,
                                      ledger=ledger)
        return summary, list(seen.lines), dict(during), ledger, page

    try:
        yield run
    finally:
        logger.removeHandler(seen)
        logger.setLevel(level)


def progress(lines: list[str], step: str) -> list[str]:
    return [text for text in lines if text.startswith(f"progress {step}:")]


def ended(lines: list[str]) -> int:
    """Where the run's interactions were done: the summary line of the interactions target."""
    return next(i for i, text in enumerate(lines) if f"-> {INTERACTION}:" in text)


def test_a_slow_reconciliation_logs_progress_before_it_ends_and_the_page_shows_it(story):
    summary, lines, during, ledger, page = story(repair=True)
    counts = summary["objects"][INTERACTION]
    missing = counts["missing"]
    assert missing > 20 and counts["repaired"] == missing, counts  # nothing sent yet: every valid one, written

    # the reads: the activities, 5 a page, counted against the query's total
    read = progress(lines, "extract clinical_activities")
    assert len(read) > 2 and "ETA" in read[0] and re.search(r": \d+ of \d+ records \(\d+%\)", read[0]), read
    # the validation, block by block (16 rows each)
    validated = progress(lines, "validate crm_activity__v")
    assert len(validated) > 2 and ", done" in validated[-1], validated
    # the repair's writes, batch by batch: lines while running, before the run's end, then the final one
    repair = progress(lines, f"repair {INTERACTION}")
    done = [int(m.group(1)) for m in (re.search(rf": (\d+) of {missing} records", t) for t in repair) if m]
    assert len(done) == len(repair) > 2 and done[-1] == missing and done[:-1] == sorted(done[:-1]), repair
    assert all(0 < d < missing for d in done[:-1])
    assert "ETA" in repair[0] and "/s" in repair[0] and "elapsed" in repair[0]
    assert re.search(r"\d+ calls left in the burst window", repair[0]), repair[0]
    assert ", done," in repair[-1]
    assert lines.index(repair[0]) < ended(lines), "progress only once the reconciliation had ended"

    # the ledger held each step's running figures while the reconciliation ran, and the page showed them
    step = f"repair {INTERACTION}"
    assert step in during and "extract clinical_activities" in during
    row, html = during[step]
    figures = row["progress"][step]
    assert row["state"] == "running" and figures["state"] == "running" and 0 < figures["done"] < missing
    assert figures["total"] == missing and figures["burst_remaining"] is not None and figures["rate"] > 0
    section = html.split("<h3>Reconciliation")[1].split('<table class="drift">')[0]
    shown = re.search(rf'class="progress progress-running reconcile-progress" data-reconcile-run="{row["run_id"]}" '
                      rf'data-step="{step}" data-done="(\d+)" data-total="{missing}"', section)
    assert shown and 0 < int(shown.group(1)) < missing, section
    assert f"{figures['done']} of {missing} records" in section

    # kept when it ends: every step's final figures; the page shows a finished one's no more
    assert "reconcile-progress" not in page.get("/").text
    final = ledger.reconcile_progress(summary["run_id"])
    assert final[step]["state"] == "done" and final[step]["done"] == missing
    assert final["validate crm_activity__v"]["state"] == "done"
    assert {"extract clinical_activities", f"compare {INTERACTION}"} <= set(final)


def test_the_comparison_reports_the_target_records_read(story):
    summary, lines, during, _, _ = story(repair=False)
    counts = summary["objects"][INTERACTION]
    assert counts["in_target"] > 20 and not any(counts[k] for k in reconcile.KINDS), counts
    compare = progress(lines, f"compare {INTERACTION}")
    done = [int(m.group(1)) for m in (re.search(r": (\d+) of (\d+) target records read", t) for t in compare) if m]
    assert len(done) == len(compare) > 2 and done == sorted(done), compare
    assert "ETA" in compare[0] and ", done," in compare[-1]
    assert lines.index(compare[0]) < ended(lines)
    assert during[f"compare {INTERACTION}"][0]["progress"][f"compare {INTERACTION}"]["state"] == "running"
    assert not progress(lines, f"repair {INTERACTION}")  # no repair asked: no writes
