"""The storage root (engine/storage.py): a local folder by default, where everything was before;
on object storage (moto's S3 server, on a loopback port, through an Airflow `aws` connection)
the run files, the alert state, the GX project (a working copy pulled and pushed under the
ledger's lock), housekeeping's deletions and the page's Data Docs all live in the bucket, and
nothing is written to the local data folder."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from clinical_crm import settings
from clinical_crm.engine import alerts, housekeeping, quality, staging, storage
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.quarantine_report import QuarantineReport, run_file
from clinical_crm.flows import ctms_to_crm
from support import STORAGE_CONN_ID, S3Server, storage_conn

MOVED = ("CLINICAL_CRM_STORAGE_URL", "CLINICAL_CRM_STORAGE_CONN_ID", "CLINICAL_CRM_REPORTS_DIR",
         "CLINICAL_CRM_STAGING_URL")
DAY = 86400
OBJECT = "crm_activity__v"


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data"
    monkeypatch.setenv("CLINICAL_CRM_DATA_DIR", str(folder))
    for key in MOVED:
        monkeypatch.delenv(key, raising=False)
    return folder


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3, data, monkeypatch) -> str:
    """A fresh bucket as the storage root `s3://<bucket>/root`, on the Airflow connection."""
    from airflow.sdk.io import store

    name = s3.new_bucket()
    monkeypatch.setenv(f"AIRFLOW_CONN_{STORAGE_CONN_ID.upper()}", storage_conn(s3.url))
    monkeypatch.setenv("CLINICAL_CRM_STORAGE_URL", f"s3://{name}/root")
    monkeypatch.setenv("CLINICAL_CRM_STORAGE_CONN_ID", STORAGE_CONN_ID)
    store._STORE_CACHE.pop(f"s3-{STORAGE_CONN_ID}", None)  # a filesystem made for an earlier server
    yield name
    assert not data.exists() or not any(p.is_file() for p in data.rglob("*") if "ledger" not in p.name), \
        sorted(data.rglob("*"))  # nothing written locally but the test's own ledger


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")


def checks_frame(cfg, *bad_ids: str) -> pd.DataFrame:
    """A check frame of one good activity and `bad_ids` with an unmapped channel."""
    base = {"person__v": "P1", "person__vr.veeva_network_id__c": "N1", "person__vr.id": "P1",
            "activity_date__v": "2026-05-01", "channel__v": "phone__v", "study__vr.global_id__sys": "1001_S1",
            "site__vr.global_id__sys": None}
    frame = pd.DataFrame([{**base, "id": "ok"}, *({**base, "id": i, "channel__v": "fax__c"} for i in bad_ids)])
    accounts = pd.DataFrame({"id": ["A1"], "veeva_network_id__v": ["N1"]})
    return ctms_to_crm.activity_checks(frame, {"accounts": accounts, "studies": {"1001_S1"}, "sites": set()}, cfg)


# ---------------------------------------------------------------- the local default


def test_the_default_root_is_the_data_folder_as_before(data, monkeypatch):
    assert settings.storage_url() == f"file://{data}"
    assert settings.staging_url() == f"file://{data}/staging"
    assert settings.reports_url() == f"file://{data}/reports"
    summary = run_file("demo", "ctms_to_crm", "manual__2026-05-01T00:00:00+00:00", ".json")
    assert isinstance(summary, Path)  # plain pathlib on a local root
    assert summary == data / "reports" / "demo" / "runs" / "ctms_to_crm" / "manual__2026-05-01T00_00_00_00_00.json"
    assert storage.name(summary) == str(summary)
    assert quality.Validator("demo", "r").root == data / "reports" / "demo" / "gx"
    assert staging.run_dir("demo", "ctms_to_crm", "r") == f"file://{data}/staging/demo/ctms_to_crm/r"
    # the older variables still move their part
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(data.parent / "elsewhere"))
    assert run_file("demo", "d", "r", ".json").parent == data.parent / "elsewhere" / "demo" / "runs" / "d"
    monkeypatch.setenv("CLINICAL_CRM_STORAGE_URL", "s3://bucket/prefix")
    assert settings.staging_url() == "s3://bucket/prefix/staging"


def test_a_local_validator_takes_the_ledgers_lock(data, demo_cfg, ledger, monkeypatch):
    taken = []
    real = ledger.exclusive

    def exclusive(name):
        taken.append(name)
        return real(name)

    monkeypatch.setattr(ledger, "exclusive", exclusive)
    verdict = quality.Validator("unit", "run1", ledger=ledger).verdict(OBJECT, checks_frame(demo_cfg, "bad"),
                                                                      ctms_to_crm.quality_rules(demo_cfg))
    assert taken == ["gx:unit"] and list(verdict.findings) == ["bad"]
    assert verdict.data_docs == str(data / "reports" / "unit" / "gx" / quality.DOCS_INDEX)
    assert not (data / "reports" / "unit" / ".gx.lock").exists()  # no lock file of its own any more


# ---------------------------------------------------------------- object storage


def test_run_files_and_alert_state_live_in_the_bucket(s3, bucket, ledger):
    report = QuarantineReport("unit", "ctms_to_crm", "manual__2026-05-01T00:00:00+00:00")
    report.add(OBJECT, {"A1": [("rule", "why, with a comma")]}, new={"A1"})
    files = report.close()
    prefix = "root/reports/unit/runs/ctms_to_crm/manual__2026-05-01T00_00_00_00_00"
    assert files["csv"] == f"s3://{bucket}/{prefix}.quarantine.csv"
    assert s3.read(bucket, f"{prefix}.quarantine.csv").decode().splitlines() == [
        "source_id,object,rules,reasons,new", f'A1,{OBJECT},rule,"why, with a comma",True']
    assert json.loads(s3.read(bucket, f"{prefix}.quarantine.json"))[0]["reasons"] == ["why, with a comma"]
    written = quality.write_summary("unit", "ctms_to_crm", "manual__2026-05-01T00:00:00+00:00", {"rows": 2})
    assert written == f"s3://{bucket}/{prefix}.json" and json.loads(s3.read(bucket, f"{prefix}.json")) == {"rows": 2}
    assert json.loads(run_file("unit", "ctms_to_crm", "manual__2026-05-01T00:00:00+00:00", ".json").read_text()) \
        == {"rows": 2}  # what the finish task's alert check reads back

    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    assert alerts.due("unit", "quarantine_age.ctms_to_crm", now, ledger=ledger)
    assert not alerts.due("unit", "quarantine_age.ctms_to_crm", now + timedelta(hours=23), ledger=ledger)
    assert alerts.due("unit", "quarantine_age.ctms_to_crm", now + timedelta(hours=25), ledger=ledger)
    state = json.loads(s3.read(bucket, "root/reports/unit/alerts_sent.json"))
    assert state == {"quarantine_age.ctms_to_crm": (now + timedelta(hours=25)).isoformat()}


def test_gx_works_in_a_copy_of_the_project_in_the_bucket(s3, bucket, demo_cfg, ledger):
    from clinical_crm.airflow import plugin

    rules = ctms_to_crm.quality_rules(demo_cfg)
    first = quality.Validator("unit", "run1", keep_runs=1, ledger=ledger).verdict(OBJECT, checks_frame(demo_cfg, "b1"), rules)
    index = "root/reports/unit/gx/uncommitted/data_docs/local_site/index.html"
    assert first.data_docs == f"s3://{bucket}/{index}" and list(first.findings) == ["b1"]
    live = s3.keys(bucket, "root/reports/unit/gx/")
    assert index in live and "root/reports/unit/gx/great_expectations.yml" in live
    run1 = [k for k in live if "/run1/" in k]
    assert {k.split("/")[5] for k in run1} == {"validations", "data_docs"} and len(run1) == 4  # 2 suites: results, pages

    # the next run: pulls the project, adds its run, archives run1 (keep_runs=1), pushes
    second = quality.Validator("unit", "run2", keep_runs=1, ledger=ledger)
    verdict = second.verdict(OBJECT, checks_frame(demo_cfg, "b2", "b3"), rules)
    assert sorted(verdict.findings) == ["b2", "b3"]
    live = s3.keys(bucket, "root/reports/unit/gx/")
    assert not [k for k in live if "/run1/" in k] and len([k for k in live if "/run2/" in k]) == 4
    archived = s3.keys(bucket, "root/reports/unit/gx_archive/")
    assert sorted(k.split("/")[4] for k in archived) == ["pages", "pages", "results", "results"]
    assert all("/run1/" in k for k in archived)
    html = s3.read(bucket, index).decode()
    assert "run2" in html and "run1" not in html  # the index lists the live window only
    assert second._copy is None and second.root.name == "gx" and not second.root.exists()  # the copy is gone

    # the page finds the run's Data Docs in the bucket and serves them (content type, CSP)
    tree = plugin._reports()
    site = plugin.report_file(verdict.data_docs, tree)
    assert site == "unit/gx/uncommitted/data_docs/local_site/index.html"
    assert plugin.report_file(f"s3://{bucket}-other/root/reports/{site}", tree) is None
    pages = plugin.validation_pages(site, "run2", tree)["run2"]
    assert sorted(p["label"] for p in pages) == [f"{OBJECT} / identifier_match", f"{OBJECT} / mapping_completeness"]
    client = TestClient(plugin.create_app(require_airflow_login=False))
    for link in (plugin.report_link(site, tree), pages[0]["link"]):
        response = client.get(f"/{link}")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), link
        assert response.headers["content-security-policy"] == plugin.REPORT_CSP and "run2" in response.text
    for outside in ("../secret.txt", "unit/../../root/reports/unit/alerts_sent.json", "unit/gx/uncommitted"):
        assert client.get(f"/reports/{outside}").status_code == 404, outside


def test_a_failed_validation_pushes_nothing(s3, bucket, demo_cfg, ledger, monkeypatch):
    rules = ctms_to_crm.quality_rules(demo_cfg)
    quality.Validator("unit", "run1", ledger=ledger).verdict(OBJECT, checks_frame(demo_cfg), rules)
    before = {k: s3.read(bucket, k) for k in s3.keys(bucket)}

    def broken(self):
        raise OSError("the disk is full")

    monkeypatch.setattr(quality.Validator, "_docs", broken)
    with pytest.raises(OSError, match="disk is full"):
        quality.Validator("unit", "run2", ledger=ledger).verdict(OBJECT, checks_frame(demo_cfg, "b"), rules)
    assert {k: s3.read(bucket, k) for k in s3.keys(bucket)} == before


def _put_gx_run(s3, bucket: str, base: str, run_name: str, days_ago: float) -> None:
    """A validation result and its page, laid out as GX lays them out (run time folder by age)."""
    stamp = (datetime.now(timezone.utc) - timedelta(days=days_ago)).strftime("%Y%m%dT%H%M%S.%fZ")
    for folder, suffix in ((quality.RESULTS, ".json"), (quality.PAGES, ".html")):
        key = f"{base}/{folder.as_posix()}/unit/{OBJECT}/completeness/{run_name}/{stamp}/batch{suffix}"
        s3.client().put_object(Bucket=bucket, Key=key, Body=b"{}")


def test_housekeeping_deletes_in_the_bucket(s3, bucket, demo_cfg, ledger):
    gx = "root/reports/unit/gx"
    for i, age in enumerate((90, 80, 3, 2, 1, 0)):
        _put_gx_run(s3, bucket, gx, f"run{i}", age)
    removed = housekeeping.Removed()
    housekeeping.gx_history("unit", 3, 30, time.time(), removed, ledger)
    live = {k.split("/")[-3] for k in s3.keys(bucket, f"{gx}/")}
    assert live == {"run3", "run4", "run5"}
    archived = s3.keys(bucket, "root/reports/unit/gx_archive/")
    assert {k.split("/")[-3] for k in archived} == {"run2"} and len(archived) == 2  # 90 and 80 days old: deleted
    assert removed.counts == {"GX runs moved out of the live project": 3, "archived GX results folders": 2,
                              "archived GX pages folders": 2}

    runs = "root/reports/unit/runs/ctms_to_crm"
    for suffix in (".json", ".quarantine.csv"):
        s3.client().put_object(Bucket=bucket, Key=f"{runs}/old{suffix}", Body=b"x")
    time.sleep(2.5)  # S3 keeps modification times by the second
    between = time.time() - 1
    for suffix in (".json", ".quarantine.csv"):
        s3.client().put_object(Bucket=bucket, Key=f"{runs}/recent{suffix}", Body=b"x")
    removed = housekeeping.Removed()
    housekeeping.run_files("unit", 30, between + 30 * DAY, removed)  # "old" is 30 days old then, "recent" not
    assert s3.keys(bucket, runs) == [f"{runs}/recent.json", f"{runs}/recent.quarantine.csv"]
    housekeeping.run_files("unit", 30, time.time() + 90 * DAY, removed)  # the newest run's files always stay
    assert len(s3.keys(bucket, runs)) == 2 and removed.counts == {"run files": 2}

    staged = "root/staging/unit/ctms_to_crm/crashed/activities.parquet"
    s3.client().put_object(Bucket=bucket, Key=staged, Body=b"x" * 100)
    housekeeping.staged_leftovers("unit", 48, time.time(), removed)
    assert s3.keys(bucket, "root/staging/") == [staged]  # written just now: kept
    housekeeping.staged_leftovers("unit", 48, time.time() + 49 * 3600, removed)
    assert s3.keys(bucket, "root/staging/") == [] and removed.counts["staged runs"] == 1 and removed.bytes == 2 + 100


def test_staging_reads_and_writes_the_bucket(s3, bucket):
    url = f"{staging.run_dir('unit', 'ctms_to_crm', 'manual__1')}/activities.parquet"
    assert url == f"s3://{bucket}/root/staging/unit/ctms_to_crm/manual__1/activities.parquet"
    staged = staging.write_frames(url, [pd.DataFrame({"id": ["a", "b"]})])
    assert staged.rows == 2 and staging.read_frame(url)["id"].tolist() == ["a", "b"]
    assert s3.keys(bucket, "root/staging/") == ["root/staging/unit/ctms_to_crm/manual__1/activities.parquet"]
    staging.remove_run(url.rsplit("/", 1)[0])
    assert s3.keys(bucket, "root/staging/") == []
