"""A small ledger story for the page tests, written through the ledger's write API."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from clinical_crm.engine.ledger import Ledger

# Text that must come out escaped, never as markup.
NASTY_REASON = '<script>alert("x")</script> no CRM account for person'


def fill_ledger(url: str, reports_dir: Path) -> dict:
    """Three runs of `demo` (one failed on its DQ check, one of 18 unchanged records, a missed
    crm_to_ctms window), one run of `other`, quarantine, history."""
    ledger = Ledger(url)
    # A Data Docs site laid out like Great Expectations' (validations/<suite path>/<run>/<time>/...).
    report = reports_dir / "demo" / "gx" / "data_docs" / "index.html"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("<html><body><h1>Data Docs of demo</h1></body></html>")
    # The 10:00 DAG run id exists in both directions: each run's page lists its own objects' suites.
    for run_name, object_name in (("scheduled__2026-11-25T10:00:00+00:00", "clinical_interaction__v"),
                                  ("scheduled__2026-11-25T10:00:00+00:00", "call2__v"),
                                  ("scheduled__2026-11-25T09:00:00+00:00", "clinical_interaction__v")):
        page = (report.parent / "validations" / "demo" / object_name / "identifier_match" / run_name
                / "20261125T110000Z" / f"demo_checks-{object_name}.html")
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"<html><body><h1>Validation of {object_name} in {run_name}</h1></body></html>")

    run1 = ledger.start_run("demo", "ctms_to_crm", "scheduled__2026-11-25T10:00:00+00:00",
                            datetime(2026, 11, 25, 9, 50, tzinfo=timezone.utc),
                            datetime(2026, 11, 25, 11, 0, tzinfo=timezone.utc))
    ledger.add_outcomes(run1, "demo", "ctms_to_crm", "clinical_interaction__v", [
        {"source_id": "V1A0000000000001", "target_id": "V2C0000000000001", "outcome": "created"},
        {"source_id": "V1A0000000000002", "target_id": "V2C0000000000002", "outcome": "unchanged"},
        {"source_id": "V1A0000000000003", "outcome": "failed", "error_type": "INVALID_DATA",
         "message": "call_channel__v: unknown value"},
    ])
    ledger.quarantine_records(run1, "demo", "ctms_to_crm", "clinical_interaction__v",
                              {"V1A0000000000004": [NASTY_REASON, "missing channel"]})
    ledger.map_ids("demo", "clinical_interaction__v", [
        {"source_id": "V1A0000000000001", "target_id": "V2C0000000000001", "external_id": "1001_V1A0000000000001"}])
    ledger.add_dq_summary(run1, "demo", "ctms_to_crm", "clinical_interaction__v", rows=4, failing_rows=1,
                          reasons={"no CRM account for person": 1}, success=True, report_path=str(report))
    # as the load counts: the ledger's "loaded" is created + updated + unchanged
    counts1 = {"clinical_interaction__v": {"extracted": 4, "created": 1, "updated": 0, "unchanged": 1, "loaded": 2,
                                           "quarantined": 1, "failed": 1, "deletions_applied": 2}}
    ledger.finish_run(run1, "success", counts=counts1, dq_report=str(report))

    run2 = ledger.start_run("demo", "crm_to_ctms", "scheduled__2026-11-25T11:00:00+00:00",
                            datetime(2026, 11, 25, 10, 50, tzinfo=timezone.utc),
                            datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc))
    ledger.add_dq_summary(run2, "demo", "crm_to_ctms", "crm_activity__v", rows=10, failing_rows=6,
                          reasons={"unknown channel": 6}, success=False, report_path=None)
    ledger.finish_run(run2, "failed", counts={"extracted": 10, "quarantined": 6}, message="too many rows quarantined")

    run3 = ledger.start_run("other", "ctms_to_crm", "manual__2026-11-25T12:00:00+00:00",
                            datetime(2026, 11, 25, 11, 0, tzinfo=timezone.utc),
                            datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc))
    ledger.finish_run(run3, "success", counts={"extracted": 0, "loaded": 0})

    # crm_to_ctms of the same DAG run id as run1, 18 records all unchanged; its window ends at
    # 09:50 and the next crm_to_ctms window (run2) starts at 10:50: a missed hour.
    run4 = ledger.start_run("demo", "crm_to_ctms", "scheduled__2026-11-25T10:00:00+00:00",
                            datetime(2026, 11, 25, 8, 50, tzinfo=timezone.utc),
                            datetime(2026, 11, 25, 9, 50, tzinfo=timezone.utc))
    ledger.add_dq_summary(run4, "demo", "crm_to_ctms", "call2__v", rows=18, failing_rows=0,
                          reasons={}, success=True, report_path=str(report))
    ledger.finish_run(run4, "success", counts={"call2__v": {"extracted": 18, "created": 0, "updated": 0,
                                                            "unchanged": 18, "loaded": 18}}, dq_report=str(report))
    fill_trial(ledger)
    return {"report": report, "runs": [run1, run2, run3, run4]}


def fill_trial(ledger: Ledger) -> None:
    """`trial`: a day of hourly ctms_to_crm runs, for the console's chart: varying counts and
    durations, one failed run and one missed hour (10:00)."""
    from sqlalchemy import update

    from clinical_crm.engine.ledger import runs

    start = datetime(2026, 11, 24, 0, 0, tzinfo=timezone.utc)
    for hour in range(16):
        if hour == 10:
            continue
        begin = start + timedelta(hours=hour)
        run = ledger.start_run("trial", "ctms_to_crm", f"scheduled__{begin.isoformat()}", begin,
                               begin + timedelta(hours=1))
        created, updated, held = (hour * 7) % 40, (hour * 13) % 25, (hour * 5) % 9
        failed = hour == 13
        ledger.finish_run(run, "failed" if failed else "success",
                          message="too many rows quarantined" if failed else None,
                          counts={"crm_activity__v": {"extracted": created + updated + held + 5, "created": created,
                                                      "updated": updated, "unchanged": 5, "quarantined": held,
                                                      "failed": hour % 4 == 0 and 2 or 0}})
        with ledger.engine.begin() as db:  # run times as a scheduler would have them: 40 s to 4 min
            db.execute(update(runs).where(runs.c.id == run).values(
                started_at=begin + timedelta(hours=1, minutes=1),
                ended_at=begin + timedelta(hours=1, minutes=1, seconds=40 + (hour * 37) % 200)))
