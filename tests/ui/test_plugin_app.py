"""The data engineers' page as a FastAPI app, against a real ledger filled through its write API."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from clinical_crm.airflow import plugin
from ledger_fixture import NASTY_REASON, fill_ledger


@pytest.fixture
def story(tmp_path, monkeypatch):
    reports = tmp_path / "reports"
    reports.mkdir()
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", url)
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(reports))
    (tmp_path / "secret.txt").write_text("not for the browser")
    return fill_ledger(url, reports)


@pytest.fixture
def client(story):
    return TestClient(plugin.create_app(require_airflow_login=False))


def section(html: str, connection: str) -> str:
    match = re.search(rf'<section class="connection" data-connection="{connection}">(.*?)</section>', html, re.S)
    assert match, f"no section for {connection}"
    return match.group(1)


def test_overview_lists_runs_per_connection_with_windows_counts_and_dq(client):
    response = client.get("/")
    assert response.status_code == 200
    demo = section(response.text, "demo")
    assert "scheduled__2026-11-25T10:00:00+00:00" in demo
    assert "2026-11-25 09:50:00" in demo and "2026-11-25 11:00:00" in demo
    first_run = demo.split('data-dag-run-id="scheduled__2026-11-25T10:00:00+00:00"')[1].split("</tr>")[0]
    counts = dict(re.findall(r'class="num count-(\w+)">(\d+)<', first_run))
    assert counts == {"extracted": "4", "loaded": "1", "unchanged": "1", "quarantined": "1", "failed": "1"}
    assert 'class="dq-pass"' in first_run
    assert 'class="data-docs" href="reports/demo/gx/data_docs/index.html"' in first_run
    run_pages = re.findall(r'class="data-docs-run" href="([^"]+)"[^>]*>([^<]+)<', first_run)
    assert run_pages == [(
        "reports/demo/gx/data_docs/validations/demo/crm_activity__v/identifier_match/"
        "scheduled__2026-11-25T10%3A00%3A00%2B00%3A00/20261125T110000Z/demo_checks-crm_activity__v.html",
        "crm_activity__v / identifier_match")]  # this run's page only, not the 09:00 run's
    breakdown = demo.split('data-dag-run-id="scheduled__2026-11-25T10:00:00+00:00"')[1].split('<tr class="objects">')[1]
    breakdown = re.sub(r"<[^>]+>|\s+", " ", breakdown.split("</tr>")[0])
    assert "clinical_interaction__v: extracted 4, loaded 1, unchanged 1, quarantined 1, failed 1, deletions_applied 2" in " ".join(breakdown.split())
    second_run = demo.split('data-dag-run-id="scheduled__2026-11-25T11:00:00+00:00"')[1].split("</tr>")[0]
    assert 'class="dq-fail"' in second_run and "too many rows quarantined" in second_run
    assert "data-docs" not in second_run  # no report file, no link
    other = section(response.text, "other")
    assert "manual__2026-11-25T12:00:00+00:00" in other
    assert "scheduled__" not in other  # runs are listed under their own connection


def test_open_quarantine_shows_reasons_escaped(client):
    html = client.get("/").text
    demo = section(html, "demo")
    assert "V1A0000000000004" in demo and "missing channel" in demo
    assert NASTY_REASON not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; no CRM account for person" in html
    assert "Nothing held back." in section(html, "other")


def test_record_lookup_shows_outcomes_quarantine_and_id_map(client):
    response = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000001"})
    assert response.status_code == 200
    assert "created" in response.text and "V2C0000000000001" in response.text
    assert "1001_V1A0000000000001" in response.text
    failed = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000003"}).text
    assert "INVALID_DATA: call_channel__v: unknown value" in failed
    held = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000004"}).text
    assert "missing channel" in held and "still open" in held


def test_record_lookup_of_unknown_record_says_so(client):
    response = client.get("/record", params={"connection": "demo", "source_id": "<b>nope</b>"})
    assert response.status_code == 200
    assert 'id="record-not-found"' in response.text
    assert "<b>nope</b>" not in response.text


def test_record_lookup_requires_a_source_id(client):
    assert client.get("/record", params={"connection": "demo", "source_id": ""}).status_code == 422


def test_data_docs_are_served_from_the_reports_folder(client):
    response = client.get("/reports/demo/gx/data_docs/index.html")
    assert response.status_code == 200
    assert "Data Docs of demo" in response.text
    assert response.headers["content-security-policy"].startswith("sandbox")  # no access to the Airflow session
    assert response.headers["x-content-type-options"] == "nosniff"
    first_run = client.get("/").text.split('data-dag-run-id="scheduled__2026-11-25T10:00:00+00:00"')[1]
    link = re.search(r'class="data-docs-run" href="([^"]+)"', first_run).group(1)
    page = client.get("/" + link)
    assert page.status_code == 200
    assert "Validation of scheduled__2026-11-25T10:00:00+00:00" in page.text


@pytest.mark.parametrize("path", [
    "../secret.txt", "..%2Fsecret.txt", "demo/../../secret.txt", "%2e%2e/secret.txt", "/etc/passwd",
    "demo/gx/data_docs", "missing.html",
])
def test_report_paths_outside_the_reports_folder_are_refused(client, path):
    response = client.get(f"/reports/{path}")
    assert response.status_code == 404
    assert "not for the browser" not in response.text


def test_empty_ledger_says_there_are_no_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    response = TestClient(plugin.create_app(require_airflow_login=False)).get("/")
    assert response.status_code == 200
    assert 'id="no-runs"' in response.text


def test_the_page_requires_an_airflow_login(story):
    client = TestClient(plugin.create_app())
    assert client.get("/").status_code == 401
    assert client.get("/reports/demo/gx/data_docs/index.html").status_code == 401


def test_plugin_registers_the_app_and_a_nav_view():
    registered = plugin.ClinicalCrmPlugin
    assert registered.fastapi_apps[0]["url_prefix"] == "/clinical-crm"
    view = registered.external_views[0]
    assert view["destination"] == "nav" and view["url_route"] == "clinical-crm"
    assert not view["href"].startswith("/")


def test_airflow_loads_the_plugin_once_through_its_entry_point():
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [app["url_prefix"] for app in apps].count("/clinical-crm") == 1
    errors = plugins_manager.get_import_errors()
    assert not errors, (
        f"Airflow reports plugin import errors: {errors}. 'already registered' means the project's "
        "metadata is found twice: `pip install -e .` leaves include/*.egg-info next to the package "
        "(include/ is on sys.path); delete it after installing (scripts/setup.sh, Dockerfile).")


def test_unreachable_ledger_is_reported_without_its_password(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", "postgresql+psycopg2://crm:s3cret@127.0.0.1:1/ledger")
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    response = TestClient(plugin.create_app(require_airflow_login=False)).get("/")
    assert response.status_code == 503
    assert 'id="ledger-unavailable"' in response.text
    assert "127.0.0.1:1/ledger" in response.text and "OperationalError" in response.text
    assert "s3cret" not in response.text


def test_record_lookup_shows_a_superseded_version(story, client):
    """An older extraction that was not written over a newer version: the outcome, why, and the version sent."""
    from datetime import datetime, timezone

    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.settings import ledger_url

    ledger = Ledger(ledger_url())
    run = story["runs"][0]
    ledger.add_outcomes(run, "demo", "ctms_to_crm", "crm_activity__v", [
        {"source_id": "V1A0000000000009", "outcome": "superseded",
         "message": "a newer version (modified 2026-11-25T10:20:00.000Z) was already sent; "
                    "this run's older version (modified 2026-11-25T09:55:00.000Z) was not written"}])
    ledger.record_versions("demo", "ctms_to_crm", "crm_activity__v",
                           {"V1A0000000000009": datetime(2026, 11, 25, 10, 20, tzinfo=timezone.utc)}, run_id=run)
    html = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000009"}).text
    outcome = re.search(r'<tr class="outcome">(.*?)</tr>', html, re.S).group(1)
    assert 'class="outcome-superseded">superseded<' in outcome
    assert "a newer version (modified 2026-11-25T10:20:00.000Z) was already sent" in outcome
    versions = html.split('<table class="versions">')[1].split("</table>")[0]
    assert "2026-11-25 10:20:00" in versions and "crm_activity__v" in versions
    # a record with outcomes but no version says so
    other = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000001"}).text
    assert "No version recorded." in other
