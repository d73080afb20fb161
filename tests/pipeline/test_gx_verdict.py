"""One verdict: the records the validate step quarantines are exactly the rows Great
Expectations reports unexpected in the run's stored validation results (Data Docs read those),
over several chunks validated at once, and each quarantined record's rules are the rules of the
expectations that name it."""
from __future__ import annotations

import csv
import functools
from datetime import datetime, timezone

import pandas as pd

from clinical_crm.engine import quality, runner, staging
from clinical_crm.engine.context import RunContext, Staged
from clinical_crm.engine.ledger import Ledger
from clinical_crm.flows import ctms_to_crm as flow_module
from clinical_crm.flows.base import VALID

GOOD = {"person__v": "P1", "person__vr.veeva_network_id__c": "N1", "person__vr.id": "P1",
        "activity_date__v": "2026-05-01", "channel__v": "phone__v", "study__vr.global_id__sys": "1001_S1",
        "site__vr.global_id__sys": None}
DEFECTS = {
    "no_person": {"person__v": None, "person__vr.veeva_network_id__c": None, "person__vr.id": None},
    "person_gone": {"person__v": "P404", "person__vr.veeva_network_id__c": None, "person__vr.id": None},
    "no_account": {"person__vr.veeva_network_id__c": "N9"},
    "ambiguous": {"person__vr.veeva_network_id__c": "N2"},
    "bad_channel": {"channel__v": "fax__c"},
    "no_channel": {"channel__v": None},
    "bad_date": {"activity_date__v": "2026-02-30"},
    "absurd_date": {"activity_date__v": "1899-01-01"},
    "no_date": {"activity_date__v": None},
    "no_study": {"study__vr.global_id__sys": "1001_S404"},
    "no_site": {"site__vr.global_id__sys": "1001_X404"},
}


def stored_unexpected(connection: str, run_key: str) -> dict[str, set[str]]:
    """{source_id: rules} of the rows GX reports unexpected in the run's stored results."""
    context = quality.Validator(connection, run_key).context
    found: dict[str, set[str]] = {}
    keys = [k for k in context.validation_results_store.list_keys() if k.run_id.run_name == run_key]
    assert len(keys) == 2  # one validation per suite for the whole run, not one per chunk
    for key in keys:
        for result in context.validation_results_store.get(key).results:
            for entry in result.result.get("unexpected_index_list") or []:
                for source_id in entry["source_id"]:
                    found.setdefault(source_id, set()).add(result.expectation_config.meta["rule"])
    return found


def test_quarantined_ids_are_gx_unexpected_rows(demo_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path / "reports"))
    monkeypatch.setenv("CLINICAL_CRM_STAGING_URL", f"file://{tmp_path / 'staging'}")
    monkeypatch.setattr(staging, "read_chunks", functools.partial(staging.read_chunks, chunk_rows=4))  # several chunks
    cfg = demo_cfg.model_copy(update={"quality": demo_cfg.quality.model_copy(update={"max_failing_share": 1.0})})
    rows = [{**GOOD, "id": f"ok{i}"} for i in range(6)] + [{**GOOD, **d, "id": name} for name, d in DEFECTS.items()]
    rows.append({**GOOD, **DEFECTS["no_account"], "id": "no_account"})  # read twice (re-read by id): one record
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    t0 = datetime(2026, 5, 1, tzinfo=timezone.utc)
    run_key = "manual__2026-05-01T00:00:00+00:00"
    ctx = RunContext(cfg.name, "ctms_to_crm", run_key, t0.isoformat(), t0.isoformat(), True,
                     staging.run_dir(cfg.name, "ctms_to_crm", run_key),
                     ledger.start_run(cfg.name, "ctms_to_crm", run_key, t0, t0))
    columns = flow_module.clinical_activity_query(cfg).columns

    def stage(name, frame, cols=None):
        return staging.write_frames(f"{ctx.run_dir}/{name}.parquet", [frame], cols)

    staged = Staged({
        flow_module.CLINICAL_ACTIVITIES: stage(flow_module.CLINICAL_ACTIVITIES, pd.DataFrame(rows), columns),
        flow_module.ACCOUNTS: stage(flow_module.ACCOUNTS, pd.DataFrame(
            {"id": ["A1", "A2", "A3"], "veeva_network_id__v": ["N1", "N2", "N2"]})),
        flow_module.KNOWN_STUDIES: stage(flow_module.KNOWN_STUDIES, pd.DataFrame({"external_id": ["1001_S1"]})),
        flow_module.KNOWN_SITES: stage(flow_module.KNOWN_SITES, pd.DataFrame({"external_id": ["1001_X1"]})),
    })

    valid = runner.validate(flow_module.build(cfg), cfg, ctx, staged, ledger=ledger)

    unexpected = stored_unexpected(cfg.name, run_key)
    quarantined = set(ledger.quarantined_ids(cfg.name, "ctms_to_crm", "crm_activity__v"))
    assert quarantined == set(unexpected) == set(DEFECTS)
    report = next((tmp_path / "reports" / cfg.name / "runs" / "ctms_to_crm").glob("*.quarantine.csv"))
    rules = {r["source_id"]: set(r["rules"].split("; ")) for r in csv.DictReader(open(report, encoding="utf-8"))}
    assert rules == unexpected
    passed = set(staging.read_frame(valid.path(VALID))["id"])
    assert passed == {f"ok{i}" for i in range(6)}
    counts = ledger.run(ctx.run_id)["counts"]["crm_activity__v"]
    assert counts == {"quarantined": len(DEFECTS), "valid": 6}
