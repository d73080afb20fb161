"""The run's quarantine files (CSV and JSON next to the DQ summary) and the task-log excerpt."""
from __future__ import annotations

import csv
import json
import logging

import pandas as pd

from clinical_crm.engine import quality
from clinical_crm.engine.quarantine_report import LOG_FIRST, QuarantineReport
from clinical_crm.flows import crm_to_ctms, ctms_to_crm

ACCOUNTS = pd.DataFrame({"id": ["A1"], "veeva_network_id__v": ["N1"]})


def findings_of(cfg, frame):
    checks = ctms_to_crm.activity_checks(frame, {"accounts": ACCOUNTS, "studies": {"S1"}, "sites": set()}, cfg)
    verdict = quality.Validator("unit", "test", stored=False).verdict("crm_activity__v", checks,
                                                                        ctms_to_crm.quality_rules(cfg))
    return verdict.findings


def test_files_hold_ids_rules_and_reasons_only(demo_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    frame = pd.DataFrame([
        # a Person named Ann Lee (ann.lee@example.org) without the identifier; a Person record gone
        {"id": "V1", "person__v": "P1", "person__vr.id": "P1", "person__vr.veeva_network_id__c": None,
         "person__vr.first_name__sys": "Ann", "person__vr.last_name__sys": "Lee",
         "created_by__vr.email__sys": "ann.lee@example.org", "activity_date__v": "2026-05-01",
         "channel__v": "phone__v"},
        {"id": "V2", "person__v": "P404", "person__vr.id": None, "person__vr.veeva_network_id__c": None,
         "activity_date__v": "2026-05-01", "channel__v": "fax__c"},
        {"id": "V3", "person__v": "P1", "person__vr.id": "P1", "person__vr.veeva_network_id__c": "N1",
         "activity_date__v": "2026-05-01", "channel__v": "phone__v"},
    ])
    report = QuarantineReport("unit", "ctms_to_crm", "manual__2026-05-01T00:00:00+00:00")
    report.add("crm_activity__v", findings_of(demo_cfg, frame), new={"V2"})
    with caplog.at_level(logging.WARNING):
        report.log_first()
    files = report.close()

    assert files["records"] == 2 and files["new"] == 1
    assert files["csv"] == str(tmp_path / "unit" / "runs" / "ctms_to_crm"
                               / "manual__2026-05-01T00_00_00_00_00.quarantine.csv")
    rows = {r["source_id"]: r for r in csv.DictReader(open(files["csv"], encoding="utf-8"))}
    assert set(rows) == {"V1", "V2"}
    assert rows["V1"]["object"] == "crm_activity__v" and rows["V1"]["new"] == "False"
    assert rows["V1"]["rules"] == "person_has_identifier; person_account_match"
    assert rows["V1"]["reasons"].startswith("Person P1 has no veeva_network_id__c")
    assert rows["V2"]["rules"] == "person_has_identifier; channel_mapped; person_account_match"
    assert "Person P404 does not exist in CTMS" in rows["V2"]["reasons"]
    records = json.loads(open(files["json"], encoding="utf-8").read())
    assert [r["source_id"] for r in records] == ["V1", "V2"]
    assert records[1]["rules"][1] == "channel_mapped" and records[1]["new"] is True
    assert records[1]["reasons"][1] == "channel 'fax__c' is not in the channel map"
    everything = open(files["csv"]).read() + open(files["json"]).read() + caplog.text
    for personal in ("Ann", "Lee", "ann.lee@example.org", "@"):
        assert personal not in everything
    assert "crm_activity__v V2 (new): [person_has_identifier] Person P404 does not exist" in caplog.text


def test_log_lists_the_first_twenty(demo_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    report = QuarantineReport("unit", "crm_to_ctms", "run")
    report.add("call2__v", {f"C{i}": [("status_present", "status missing")] for i in range(30)}, new=set())
    with caplog.at_level(logging.WARNING):
        report.log_first()
    files = report.close()
    assert files["records"] == 30 and len(json.loads(open(files["json"]).read())) == 30
    assert sum("status missing" in line for line in caplog.text.splitlines()) == LOG_FIRST


def test_empty_run_writes_empty_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    files = QuarantineReport("unit", "crm_to_ctms", "run").close()
    assert json.loads(open(files["json"]).read()) == []
    assert open(files["csv"]).read().strip() == "source_id,object,rules,reasons,new"


def test_inbound_account_gone_is_named(demo_cfg):
    calls = pd.DataFrame([{"id": "C1", "account__v": "A404", "account__vr.id": None,
                           "account__vr.veeva_network_id__v": None, "call_channel__v": "phone__v",
                           "call2_status__v": "saved__v", "call_date__v": "2026-05-01"}])
    checks = crm_to_ctms.call_checks(calls, {"persons": pd.DataFrame({"id": [], "veeva_network_id__c": []})}, demo_cfg)
    found = quality.Validator("unit", "test", stored=False).verdict("call2__v", checks,
                                                                      crm_to_ctms.quality_rules(demo_cfg)).findings
    assert found["C1"][0] == ("account_has_identifier", "Account A404 does not exist in CRM (deleted, or not readable "
                                                     "by the integration user): set an existing Account on the record")
