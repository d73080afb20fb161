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


def run_row(html: str, dag_run_id: str, direction: str = "ctms_to_crm", with_breakdown: bool = False) -> str:
    """The runs-list row of one run (and its per-object breakdown row)."""
    rest = html.split(f'data-dag-run-id="{dag_run_id}" data-direction="{direction}"')[1]
    rows = rest.split("</tr>")
    return "</tr>".join(rows[:2]) if with_breakdown else rows[0]


def test_overview_lists_runs_per_connection_with_windows_counts_and_dq(client):
    response = client.get("/")
    assert response.status_code == 200
    demo = section(response.text, "demo")
    assert "scheduled__2026-11-25T10:00:00+00:00" in demo
    assert "2026-11-25 09:50:00" in demo and "2026-11-25 11:00:00" in demo
    first_run = run_row(demo, "scheduled__2026-11-25T10:00:00+00:00")
    counts = dict(re.findall(r'class="num count-(\w+)">(\d+)<', first_run))
    assert counts == {"extracted": "4", "loaded": "1", "unchanged": "1", "quarantined": "1", "failed": "1"}
    assert 'class="dq-pass"' in first_run
    assert 'class="data-docs" href="reports/demo/gx/data_docs/index.html"' in first_run
    run_pages = re.findall(r'class="data-docs-run" href="([^"]+)"[^>]*>([^<]+)<', first_run)
    assert run_pages == [(
        "reports/demo/gx/data_docs/validations/demo/clinical_interaction__v/identifier_match/"
        "scheduled__2026-11-25T10%3A00%3A00%2B00%3A00/20261125T110000Z/demo_checks-clinical_interaction__v.html",
        "clinical_interaction__v / identifier_match")]  # this run's page only, not the 09:00 run's
    breakdown = run_row(demo, "scheduled__2026-11-25T10:00:00+00:00",
                        with_breakdown=True).split('<tr class="objects">')[1]
    breakdown = re.sub(r"<[^>]+>|\s+", " ", breakdown.split("</tr>")[0])
    assert ("clinical_interaction__v: extracted 4, loaded 1, unchanged 1, quarantined 1, failed 1, deletions_applied 2"
            in " ".join(breakdown.split()))
    second_run = run_row(demo, "scheduled__2026-11-25T11:00:00+00:00", "crm_to_ctms")
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
    first_run = run_row(client.get("/").text, "scheduled__2026-11-25T10:00:00+00:00")
    link = re.search(r'class="data-docs-run" href="([^"]+)"', first_run).group(1)
    page = client.get("/" + link)
    assert page.status_code == 200
    assert "Validation of clinical_interaction__v in scheduled__2026-11-25T10:00:00+00:00" in page.text


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


# ---------------------------------------------------------------- the operations console

TEN = "scheduled__2026-11-25T10:00:00+00:00"


def test_a_runs_data_quality_lists_only_its_own_suites(client):
    """Both directions ran as DAG run `TEN`; the GX site holds both runs' pages under that name."""
    demo = section(client.get("/").text, "demo")
    ctms_to_crm = re.findall(r'class="data-docs-run" href="[^"]+"[^>]*>([^<]+)<', run_row(demo, TEN))
    crm_to_ctms = re.findall(r'class="data-docs-run" href="[^"]+"[^>]*>([^<]+)<', run_row(demo, TEN, "crm_to_ctms"))
    assert ctms_to_crm == ["clinical_interaction__v / identifier_match"]
    assert crm_to_ctms == ["call2__v / identifier_match"]


def counts_of(row: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r'class="num count-(\w+)">(\d+)<', row)}


def breakdown_of(row_with_breakdown: str) -> dict[str, dict[str, int]]:
    text = " ".join(re.sub(r"<[^>]+>", " ", row_with_breakdown.split('<tr class="objects">')[1]).split())
    return {obj: {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", body)}
            for obj, body in re.findall(r"(\w+): ([^·]+)", text.replace("&middot;", "·"))}


def test_loaded_means_written_and_the_row_agrees_with_its_breakdown(client):
    demo = section(client.get("/").text, "demo")
    unchanged_run = counts_of(run_row(demo, TEN, "crm_to_ctms"))
    assert unchanged_run["loaded"] == 0 and unchanged_run["unchanged"] == 18  # not "Loaded 18, Unchanged 18"
    for direction in ("ctms_to_crm", "crm_to_ctms"):
        row = run_row(demo, TEN, direction, with_breakdown=True)
        per_object = breakdown_of(row)
        assert per_object
        for column, total in counts_of(row).items():
            assert total == sum(o[column] for o in per_object.values()), (direction, column)
    assert counts_of(run_row(demo, TEN))["loaded"] == 1  # created 1 + updated 0; its unchanged 1 apart


def test_health_line_per_connection(client):
    demo = section(client.get("/").text, "demo")
    health = re.search(r'<p class="health[^"]*" data-open-quarantine="(\d+)">(.*?)</p>', demo, re.S)
    assert health.group(1) == "1"
    text = " ".join(re.sub(r"<[^>]+>", "", health.group(2)).split())
    assert "Last run: success" in text  # the newest run (crm_to_ctms, 18 unchanged)
    assert "ctms_to_crm: last successful window end 2026-11-25 11:00:00, lag" in text
    assert "crm_to_ctms: last successful window end 2026-11-25 09:50:00, lag" in text  # run2 failed
    assert re.search(r"lag \d+ (d|h|min|s)\b", text)


def test_chart_of_the_last_runs_is_a_picture(client):
    demo = section(client.get("/").text, "demo")
    svg = re.search(r"<svg class=\"chart\".*?</svg>", demo, re.S).group(0)
    bars = re.findall(r'<g class="bar state-(\w+)">(.*?)</g>', svg, re.S)
    assert [state for state, _ in bars] == ["success", "failed", "success"]  # oldest first
    first = dict(re.findall(r'class="bar-(\w+)" data-value="(\d+)"', bars[0][1]))
    assert first == {"loaded": "1", "quarantined": "1", "failed": "1"}
    assert "bar-quarantined" in bars[1][1]  # the failed run's 6 quarantined
    assert "<polyline class=\"duration\"" in svg


def test_runs_link_to_their_airflow_dag_run_and_task_logs(client):
    row = run_row(section(client.get("/").text, "demo"), TEN)
    base = "/dags/ctms_to_crm__demo/runs/scheduled__2026-11-25T10%3A00%3A00%2B00%3A00"
    assert f'class="airflow-link airflow-run" href="{base}"' in row
    tasks = re.findall(r'class="airflow-link airflow-task" href="([^"]+)"', row)
    assert f"{base}/tasks/extract" in tasks and f"{base}/tasks/load" in tasks
    # the demo file enables automated activities: the pre-step's task is linked too, in run order
    assert [t.rsplit("/", 1)[1] for t in tasks] == ["begin", "automate_activities", "extract", "validate",
                                                     "transform", "load", "finish"]


def test_missed_and_failed_windows_are_marked_with_a_backfill(as_user):
    demo = section(as_user("erin", "user").get("/").text, "demo")
    gap = re.search(r'<tr class="gap" data-direction="crm_to_ctms">(.*?)</tr>', demo, re.S).group(1)
    assert "2026-11-25 09:50:00" in gap and "2026-11-25 10:50:00" in gap
    assert 'name="window_start" value="2026-11-25T09:50:00+00:00"' in gap and "Backfill this window" in gap
    assert "Backfill this window" in run_row(demo, "scheduled__2026-11-25T11:00:00+00:00", "crm_to_ctms")  # failed
    assert "Backfill this window" not in run_row(demo, TEN)  # succeeded, no gap before it
    assert demo.count('<tr class="gap"') == 1
    seen_by_viewer = section(as_user("vic", "viewer").get("/").text, "demo")
    assert '<tr class="gap"' in seen_by_viewer and "Backfill this window" not in seen_by_viewer


# ---------------------------------------------------------------- quarantine triage


@pytest.fixture
def many_held(story):
    """130 more open records of `demo`: 100 of call2__v with one reason, 30 with another."""
    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.settings import ledger_url

    ledger = Ledger(ledger_url())
    run = story["runs"][1]
    ledger.quarantine_records(run, "demo", "crm_to_ctms", "call2__v",
                              {f"C{i:04d}": ["no CTMS site for account A1"] for i in range(100)})
    ledger.quarantine_records(run, "demo", "crm_to_ctms", "call2__v",
                              {f"D{i:04d}": ["unknown channel fax"] for i in range(30)})
    return ledger


def held_ids(html: str) -> list[str]:
    return re.findall(r'<tr class="held" data-source-id="([^"]+)"', html)


def test_quarantine_triage_filters_and_pages(client, many_held):
    page1 = client.get("/quarantine", params={"connection": "demo"}).text
    assert '<span id="quarantine-total">131</span>' in page1
    assert len(held_ids(page1)) == plugin.PAGE_SIZE and "Page 1 of 3" in page1
    page3 = client.get("/quarantine", params={"connection": "demo", "page": 3}).text
    assert held_ids(page3) == ["C0099"] + [f"D{i:04d}" for i in range(30)]  # rows 101 to 131
    fax = client.get("/quarantine", params={"connection": "demo", "rule": "channel fax"}).text
    assert held_ids(fax) == [f"D{i:04d}" for i in range(30)]
    interactions = client.get("/quarantine", params={"connection": "demo", "object": "clinical_interaction__v"}).text
    assert held_ids(interactions) == ["V1A0000000000004"]
    assert held_ids(client.get("/quarantine", params={"connection": "demo", "min_age_days": 3}).text) == []


def test_quarantine_csv_export_of_the_filtered_set(client, many_held):
    response = client.get("/quarantine.csv", params={"connection": "demo", "object": "call2__v", "rule": "fax"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    lines = response.text.strip().splitlines()
    assert lines[0] == ",".join(plugin.CSV_COLUMNS)
    assert len(lines) == 31 and all("unknown channel fax" in line for line in lines[1:])


def test_quarantine_csv_cells_are_not_spreadsheet_formulas(client, many_held):
    many_held.quarantine_records(1, "demo", "crm_to_ctms", "call2__v", {"E1": ['=HYPERLINK("http://x")']})
    text = client.get("/quarantine.csv", params={"connection": "demo", "rule": "HYPERLINK"}).text
    assert text.splitlines()[1].count("'=HYPERLINK") == 1


class User:
    """Airflow's simple auth manager's user, with a role."""

    def __new__(cls, name: str, role: str):
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

        return SimpleAuthManagerUser(username=name, role=role)


@pytest.fixture
def as_user(story, monkeypatch):
    """A client of the app with Airflow's login, as a given user (Airflow's simple auth manager
    decides the permissions)."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.core_api.security import get_user

    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    create_auth_manager()

    def client_as(name: str, role: str) -> TestClient:
        app = plugin.create_app()
        app.dependency_overrides[get_user] = lambda: User(name, role)
        return TestClient(app, base_url="http://airflow.test", follow_redirects=False)
    return client_as


def open_row(source_id: str = "V1A0000000000004") -> dict:
    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.settings import ledger_url

    return next(q for q in Ledger(ledger_url()).record_history("demo", source_id)["quarantine"])


SAME_ORIGIN = {"Origin": "http://airflow.test"}


def test_ignore_with_a_reason_is_recorded_with_the_airflow_user_and_closes_the_record(as_user):
    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.settings import ledger_url

    editor = as_user("erin", "user")  # may edit DAGs
    held = open_row()
    answer = editor.post("/quarantine/action", headers=SAME_ORIGIN, data={
        "quarantine_id": held["id"], "action": "ignore", "reason": "test record of the CRA", "back": "record"})
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("../record?connection=demo&source_id=V1A0000000000004")
    ledger = Ledger(ledger_url())
    assert ledger.quarantined_ids("demo", "ctms_to_crm", "clinical_interaction__v") == []  # never re-read
    html = editor.get("/record", params={"connection": "demo", "source_id": "V1A0000000000004"}).text
    action = re.search(r'<tr class="action">(.*?)</tr>', html, re.S).group(1)
    assert "ignore" in action and '<td class="actor">erin</td>' in action and "test record of the CRA" in action
    assert '<span class="ignored">(ignored)</span>' in html
    assert "Nothing held back." in section(editor.get("/").text, "demo")

    answer = editor.post("/quarantine/action", headers=SAME_ORIGIN,
                         data={"quarantine_id": held["id"], "action": "retry"})
    assert answer.status_code == 303
    assert ledger.quarantined_ids("demo", "ctms_to_crm", "clinical_interaction__v") == ["V1A0000000000004"]
    assert [a["action"] for a in ledger.record_history("demo", "V1A0000000000004")["actions"]] == ["ignore", "retry"]


def test_actions_need_edit_permission_on_the_dag(as_user):
    held = open_row()
    viewer = as_user("vic", "viewer")  # may read DAGs, not edit them
    answer = viewer.post("/quarantine/action", headers=SAME_ORIGIN,
                         data={"quarantine_id": held["id"], "action": "ignore", "reason": "no"})
    assert answer.status_code == 403, answer.text
    assert viewer.post("/backfill", headers=SAME_ORIGIN, data={
        "connection": "demo", "direction": "ctms_to_crm", "window_start": "2026-11-25T09:50:00+00:00",
        "window_end": "2026-11-25T11:00:00+00:00"}).status_code == 403
    assert open_row()["resolved_at"] is None
    assert viewer.get("/").status_code == 200  # reading stays allowed
    triage = viewer.get("/quarantine", params={"connection": "demo"}).text
    assert "actions need edit permission on DAG ctms_to_crm__demo" in triage and 'class="ignore"' not in triage
    editor_triage = as_user("erin", "user").get("/quarantine", params={"connection": "demo"}).text
    assert 'class="ignore"' in editor_triage and "actions need edit permission" not in editor_triage


def test_action_forms_are_refused_from_another_origin(as_user):
    editor = as_user("erin", "user")
    held = open_row()
    for headers in ({}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.example/page"}):
        answer = editor.post("/quarantine/action", headers=headers,
                             data={"quarantine_id": held["id"], "action": "ignore", "reason": "csrf"})
        assert answer.status_code == 403, headers
    assert open_row()["resolved_at"] is None
    behind_proxy = editor.post("/quarantine/action", data={"quarantine_id": held["id"], "action": "retry"},
                               headers={"Origin": "https://airflow.example.org",
                                        "X-Forwarded-Host": "airflow.example.org"})
    assert behind_proxy.status_code == 303


def test_ignore_needs_a_reason(as_user):
    answer = as_user("erin", "user").post("/quarantine/action", headers=SAME_ORIGIN,
                                          data={"quarantine_id": open_row()["id"], "action": "ignore", "reason": " "})
    assert answer.status_code == 422
    assert open_row()["resolved_at"] is None


def test_actions_require_an_airflow_login(story):
    client = TestClient(plugin.create_app())
    assert client.post("/quarantine/action", headers={"Origin": "http://testserver"},
                       data={"quarantine_id": 1, "action": "retry"}).status_code == 401
    assert client.get("/quarantine", params={"connection": "demo"}).status_code == 401
    assert client.get("/quarantine.csv", params={"connection": "demo"}).status_code == 401


def test_the_page_shows_reconciliation_drift_by_record(story, client):
    from clinical_crm.engine.ledger import Ledger

    assert "Not reconciled yet (DAG reconcile__demo)." in section(client.get("/").text, "demo")
    ledger = Ledger()
    run = ledger.start_reconcile("demo", "ctms_to_crm", "scheduled__2026-11-26T00:00:00+00:00", repair=False)
    ledger.add_drift(run, "demo", "ctms_to_crm", "clinical_interaction__v", [
        {"external_id": "1001_V1A1", "kind": "stale", "source_id": "V1A1",
         "details": {"subject__v": {"expected": "Visit", "actual": "Visti"}}},
        {"external_id": "1001_V1A9", "kind": "missing_deletion_mark", "source_id": "V1A9", "details": {}}])
    ledger.finish_reconcile(run, "success",
                            summary={"clinical_interaction__v": {"stale": 1, "missing_deletion_mark": 1}})
    demo = section(client.get("/").text, "demo")
    assert "(ctms_to_crm, report only, success)" in demo
    stale = demo.split('<tr class="drift-stale">')[1].split("</tr>")[0]
    assert "1001_V1A1" in stale and "Visti" in stale and 'href="record?connection=demo&amp;source_id=V1A1"' in stale
    assert '<tr class="drift-missing_deletion_mark">' in demo


# ---------------------------------------------------------------- issue 20: counts, progress, triage


def add_run(counts: dict, dag_run_id: str = "manual__2026-11-26T08:00:00+00:00", state: str = "success",
            progress: dict | None = None) -> int:
    from datetime import datetime, timezone

    from clinical_crm.engine.ledger import Ledger
    from clinical_crm.settings import ledger_url

    ledger = Ledger(ledger_url())
    run = ledger.start_run("demo", "ctms_to_crm", dag_run_id, datetime(2026, 11, 26, 7, tzinfo=timezone.utc),
                           datetime(2026, 11, 26, 8, tzinfo=timezone.utc))
    for step, figures in (progress or {}).items():
        ledger.set_progress(run, step, figures)
    if state == "running":
        ledger.set_counts(run, counts)
    else:
        ledger.finish_run(run, state, counts=counts)
    return run


# the demo's first ctms_to_crm run, as the runner now stores it: 66 extracted and written to CRM,
# 9 Clinical Activities written to CTMS by the pre-step (before: "extracted 66, loaded 75")
FIRST_RUN = {
    "crm_activity__v": {"extracted": 66, "created": 66, "updated": 0, "unchanged": 0, "loaded": 66},
    "pre_step": {"monitoring_event__ctms": {"created": 6, "updated": 0, "loaded": 6, "flagged": 7,
                                            "needs_person": 1},
                 "communication_log__ctms": {"created": 3, "loaded": 3, "flagged": 3, "needs_person": 0}},
}


def test_the_pre_steps_writes_to_the_source_vault_are_shown_apart_from_loaded(client):
    add_run(FIRST_RUN)
    demo = section(client.get("/").text, "demo")
    row = run_row(demo, "manual__2026-11-26T08:00:00+00:00", with_breakdown=True)
    counts = counts_of(row)
    assert counts["extracted"] == 66 and counts["loaded"] == 66  # CRM's writes only, not 75
    pre = re.search(r'<td class="num pre-step" data-written="(\d+)">(.*?)</td>', row, re.S)
    assert pre and pre.group(1) == "9"
    assert "to CTMS" in pre.group(2)
    assert 'data-object="monitoring_event__ctms">from monitoring_event__ctms created=6 flagged=7 needs_person=1' \
        in pre.group(2)
    # the per-object breakdown (the row's sums) holds the target's objects only
    assert set(breakdown_of(row)) == {"crm_activity__v"}
    assert "Pre-step (source vault)" in demo
    # a run without a pre-step: a dash
    assert 'data-written="0"><span class="muted">&ndash;</span>' in run_row(demo, TEN)


def test_runs_stored_before_the_section_keep_their_pre_step_apart(client):
    """Earlier runs stored the pre-step's objects beside the others: told by its own counts."""
    legacy = {"crm_activity__v": FIRST_RUN["crm_activity__v"], **FIRST_RUN["pre_step"]}
    add_run(legacy)
    row = run_row(section(client.get("/").text, "demo"), "manual__2026-11-26T08:00:00+00:00", with_breakdown=True)
    assert counts_of(row)["loaded"] == 66 and 'data-written="9"' in row


def test_the_demos_table_shows_the_pre_step_apart():
    import importlib.util

    from support import REPO

    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    text = demo.counts_tables({"direction": "ctms_to_crm", "counts": FIRST_RUN})
    target, pre = text.split("pre-step: written to CTMS (the source vault), not in the loaded column")
    assert "loaded to CRM" in target and "crm_activity__v" in target and "monitoring_event" not in target
    assert re.search(r"crm_activity__v\s+66\s+66\s", target)
    assert re.search(r"monitoring_event__ctms\s+6\s+0\s+0\s+7\s+1", pre)
    assert re.search(r"communication_log__ctms\s+3\s+0\s+0\s+3\s+0", pre)
    assert "pre-step" not in demo.counts_tables({"direction": "crm_to_ctms", "counts": {
        "call2__v": {"extracted": 1, "created": 1}}})


def test_a_running_runs_row_shows_its_latest_progress(client):
    figures = {"what": "load clinical_interaction__v", "done": 1200, "total": 5000, "share": 0.24, "rate": 40.0,
               "elapsed_seconds": 30.0, "eta_seconds": 95.0, "burst_remaining": 812, "state": "running"}
    add_run({"clinical_interaction__v": {"extracted": 5000}}, state="running",
            progress={"load clinical_interaction__v": figures,
                      "extract interactions": figures | {"what": "extract interactions", "done": 5000,
                                                         "state": "done"}})
    row = run_row(section(client.get("/").text, "demo"), "manual__2026-11-26T08:00:00+00:00")
    assert ('<div class="progress progress-running" data-step="load clinical_interaction__v" data-done="1200" '
            'data-total="5000" data-burst-remaining="812">') in row
    assert ("load clinical_interaction__v: 1200 of 5000 records (24%), 40.0/s, elapsed 30 s, ETA 1 min 35 s, "
            "812 calls left in the burst window") in row
    assert "extract interactions: 5000 of 5000" in row  # a step done, while the run still runs


def test_a_finished_run_shows_no_progress_and_a_failed_one_where_it_stopped(client):
    figures = {"what": "load x", "done": 10, "total": 50, "state": "failed", "elapsed_seconds": 3}
    add_run({}, progress={"load x": figures})
    add_run({}, dag_run_id="manual__failed", state="failed", progress={"load x": figures})
    demo = section(client.get("/").text, "demo")
    assert 'class="progress' not in run_row(demo, "manual__2026-11-26T08:00:00+00:00")
    assert "stopped: load x: 10 of 50 records, elapsed 3 s, failed" in run_row(demo, "manual__failed")


@pytest.fixture
def vault_hosts(monkeypatch):
    from support import vault_conn

    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn("https://ctms.example.veevavault.com/"))
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CRM_DEMO", vault_conn("crm.example.veevavault.com"))
    plugin._source_vault_hosts.cache_clear()
    yield
    plugin._source_vault_hosts.cache_clear()


def vault_link_of(html: str, source_id: str) -> str | None:
    row = html.split(f'data-source-id="{source_id}"')[1].split("</tr>")[0] if f'data-source-id="{source_id}"' in html \
        else html.split(f"{source_id}</a>")[1].split("</tr>")[0]
    found = re.search(r'<a class="vault-link" href="([^"]+)"', row)
    return found.group(1) if found else None


def test_each_quarantined_record_links_to_its_source_vaults_ui(client, many_held, vault_hosts):
    triage = client.get("/quarantine", params={"connection": "demo", "page": 3}).text
    # crm_to_ctms: the record is in the CRM vault (a bare host gets https)
    assert vault_link_of(triage, "D0001") == "https://crm.example.veevavault.com/ui/#object/call2__v/D0001"
    interactions = client.get("/quarantine", params={"connection": "demo", "object": "clinical_interaction__v"}).text
    assert vault_link_of(interactions, "V1A0000000000004") == \
        "https://ctms.example.veevavault.com/ui/#object/clinical_interaction__v/V1A0000000000004"
    assert 'target="_blank" rel="noopener noreferrer"' in interactions
    overview = section(client.get("/").text, "demo")
    assert "https://ctms.example.veevavault.com/ui/#object/clinical_interaction__v/V1A0000000000004" in overview
    record = client.get("/record", params={"connection": "demo", "source_id": "V1A0000000000004"}).text
    assert 'href="https://ctms.example.veevavault.com/ui/#object/clinical_interaction__v/V1A0000000000004"' in record


def test_without_the_airflow_connection_there_is_no_vault_link(client, many_held, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_VAULT_CRM_DEMO", raising=False)
    plugin._source_vault_hosts.cache_clear()
    triage = client.get("/quarantine", params={"connection": "demo", "rule": "fax"}).text
    assert held_ids(triage) and 'class="vault-link"' not in triage


def test_the_record_url_pattern_escapes_and_can_be_replaced(monkeypatch):
    assert plugin.vault_record_url("https://v.example/", "obj__c", "A/B C") == "https://v.example/ui/#object/obj__c/A%2FB%20C"
    assert plugin.vault_record_url(None, "obj__c", "A") is None
    monkeypatch.setenv("CLINICAL_CRM_VAULT_RECORD_URL", "{host}/r/{object}/{id}")
    assert plugin.vault_record_url("https://v.example", "o", "1") == "https://v.example/r/o/1"


def bulk(client, action: str, expected: int, **filters) -> object:
    data = {"connection": "demo", "action": action, "expected": expected, "object": "", "rule": "",
            "min_age_days": "", **filters}
    return client.post("/quarantine/bulk", headers=SAME_ORIGIN, data=data)


def test_ignore_all_records_a_filter_shows_recorded_per_record(as_user, many_held):
    from clinical_crm.engine.ledger import quarantine_actions

    editor = as_user("erin", "user")
    triage = editor.get("/quarantine", params={"connection": "demo", "rule": "channel fax"}).text
    assert 'id="ignore-all"' in triage and "Ignore all 30" in triage and 'name="expected" value="30"' in triage
    assert '<input type="hidden" name="rule" value="channel fax">' in triage
    answer = bulk(editor, "ignore", 30, rule="channel fax", reason="fax is retired")
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith("../quarantine?connection=demo&rule=channel+fax")
    assert "30+records+ignored+for+good" in answer.headers["location"]
    open_ids = set(many_held.quarantined_ids("demo", "crm_to_ctms", "call2__v"))
    assert len(open_ids) == 100 and not any(i.startswith("D") for i in open_ids)  # the others untouched
    with many_held.engine.connect() as db:
        actions = db.execute(quarantine_actions.select()).mappings().all()
    assert len(actions) == 30 and {a["source_id"] for a in actions} == {f"D{i:04d}" for i in range(30)}
    assert {(a["action"], a["actor"], a["reason"]) for a in actions} == {("ignore", "erin", "fax is retired")}
    history = many_held.record_history("demo", "D0007")["actions"]
    assert [(a["action"], a["actor"]) for a in history] == [("ignore", "erin")]

    again = bulk(editor, "retry", 0, rule="channel fax")  # nothing open matches now: a no-op
    assert again.status_code == 303 and "0+records" in again.headers["location"]


def test_retry_all_reopens_nothing_unseen_and_keeps_records_open(as_user, many_held):
    editor = as_user("erin", "user")
    stale = bulk(editor, "retry", 99, object="call2__v", rule="CTMS site")  # the page showed 99, 100 match now
    assert stale.status_code == 409 and "matches 100 records, not the 99 shown" in stale.text
    answer = bulk(editor, "retry", 100, object="call2__v", rule="CTMS site")
    assert answer.status_code == 303
    assert len(many_held.quarantined_ids("demo", "crm_to_ctms", "call2__v")) == 130  # still open: re-read
    assert [a["action"] for a in many_held.record_history("demo", "C0042")["actions"]] == ["retry"]


def test_bulk_actions_need_edit_permission_a_reason_and_the_pages_origin(as_user, many_held):
    viewer = as_user("vic", "viewer")
    assert bulk(viewer, "ignore", 30, rule="fax", reason="no").status_code == 403
    triage = viewer.get("/quarantine", params={"connection": "demo", "rule": "fax"}).text
    assert 'id="ignore-all"' not in triage and 'id="bulk-no-edit"' in triage
    editor = as_user("erin", "user")
    assert bulk(editor, "ignore", 30, rule="fax", reason="  ").status_code == 422
    data = {"connection": "demo", "action": "retry", "expected": 30, "rule": "fax"}
    assert editor.post("/quarantine/bulk", data=data, headers={"Origin": "https://evil.example"}).status_code == 403
    assert len(many_held.quarantined_ids("demo", "crm_to_ctms", "call2__v")) == 130
    with many_held.engine.connect() as db:
        from clinical_crm.engine.ledger import quarantine_actions

        assert db.execute(quarantine_actions.select()).first() is None


def test_the_filter_form_with_an_empty_age_filters_nothing(client, many_held):
    """A browser sends the empty number field as `min_age_days=`: no age filter, not a 422."""
    page = client.get("/quarantine", params={"connection": "demo", "object": "", "rule": "fax", "min_age_days": ""})
    assert page.status_code == 200 and '<span id="quarantine-total">30</span>' in page.text
    assert client.get("/quarantine.csv", params={"connection": "demo", "min_age_days": ""}).status_code == 200
    assert client.get("/quarantine", params={"connection": "demo", "min_age_days": "x"}).status_code == 422
    assert client.get("/quarantine", params={"connection": "demo", "min_age_days": "3651"}).status_code == 422
