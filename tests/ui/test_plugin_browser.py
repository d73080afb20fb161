"""The data engineers' page in a real browser, inside a real Airflow api-server.

Starts `airflow api-server` (temporary AIRFLOW_HOME, SQLite, simple auth manager with everyone
admin) with a ledger filled through its write API and two stand-in DAGs of the `demo` connection
(their ids only matter: backfills are created for them), then drives Debian's chromium headless
through playwright: the page is listed in the Airflow UI, shows the runs and the quarantine, and
the record lookup works; the operations console shows health, chart, Airflow links, quarantine
triage with an action, and a backfill created through Airflow's REST API. Screenshots are kept in
test-artifacts/ (plugin.png, plugin-record.png, console.png, console-chart.png,
console-quarantine.png, console-record-decision.png).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ledger_fixture import fill_ledger

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AIRFLOW = str(Path(sys.executable).parent / "airflow")
LEDGER: dict[str, str] = {}  # the api-server's ledger (tests add rows to it)
JWT_SECRET = secrets.token_urlsafe(32)  # the api-server's; the test signs tokens of other users with it


# The DAG ids of connection `demo` (the real DAGs need a connection file and vaults; a backfill
# needs only the DAG and its schedule).
STAND_IN_DAGS = """
from datetime import datetime, timezone
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

for direction in ("ctms_to_crm", "crm_to_ctms"):
    with DAG(f"{direction}__demo", schedule="@hourly", start_date=datetime(2026, 11, 24, tzinfo=timezone.utc),
             catchup=False) as dag:
        EmptyOperator(task_id="load")
    globals()[dag.dag_id] = dag
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh --test (apt-get install chromium)")
    home = tmp_path_factory.mktemp("airflow_home")
    reports = home / "reports"
    reports.mkdir()
    ledger_url = f"sqlite:///{home / 'ledger.db'}"
    fill_ledger(ledger_url, reports)
    LEDGER["url"] = ledger_url
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "CLINICAL_CRM_LEDGER_URL": ledger_url,
        "CLINICAL_CRM_REPORTS_DIR": str(reports),
    }
    env.pop("AIRFLOW_CONFIG", None)
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    (home / "dags").mkdir()
    (home / "dags" / "demo_stand_ins.py").write_text(STAND_IN_DAGS)
    for command in (["db", "migrate"], ["dags", "reserialize"]):
        done = subprocess.run([AIRFLOW, *command], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log_path = home / "api-server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([AIRFLOW, "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, "api-server exited:\n" + log_path.read_text()[-4000:]
            try:
                if requests.get(f"{url}/api/v2/monitor/health", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "api-server did not answer:\n" + log_path.read_text()[-4000:]
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        except ProcessLookupError:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)  # leftover uvicorn workers
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


def next_frame(page, url_part: str, timeout: float = 30):
    """The page's frame whose URL contains url_part (a sandboxed report gets a frame of its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for frame in page.frames:
            if url_part in frame.url:
                return frame
        page.wait_for_timeout(200)
    raise AssertionError(f"no frame with {url_part} in its URL: {[f.url for f in page.frames]}")


def test_plugin_is_registered_with_the_api_server(api_server):
    plugins = requests.get(f"{api_server}/api/v2/plugins", timeout=30).json()["plugins"]
    ours = [p for p in plugins if p["name"] == "clinical_crm"]
    assert len(ours) == 1
    assert ours[0]["external_views"][0]["url_route"] == "clinical-crm"
    # The UI's home page counts plugin import errors (e.g. the plugin found twice): none.
    assert requests.get(f"{api_server}/api/v2/plugins/importErrors", timeout=30).json()["import_errors"] == []


def test_page_inside_the_airflow_ui_shows_runs_quarantine_and_record_lookup(api_server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        # The page is an entry of the Airflow UI's Browse menu and opens inside the UI.
        page.goto(f"{api_server}/", wait_until="networkidle")
        page.get_by_role("button", name="Browse").click()
        page.get_by_text("Clinical CRM connection").first.click()
        page.wait_for_url("**/plugin/clinical-crm", timeout=30_000)
        frame_element = page.wait_for_selector("iframe", timeout=60_000)
        frame = frame_element.content_frame()
        frame.wait_for_selector("section.connection", timeout=60_000)
        assert frame.url.endswith("/clinical-crm/")

        demo = frame.locator('section[data-connection="demo"]')
        assert demo.locator("tr.run").count() == 3
        first = demo.locator('tr.run[data-dag-run-id="scheduled__2026-11-25T10:00:00+00:00"]'
                             '[data-direction="ctms_to_crm"]')
        assert first.locator("td.count-extracted").inner_text() == "4"
        assert first.locator("td.count-loaded").inner_text() == "1"
        assert first.locator(".dq-pass").count() == 1
        assert demo.locator(".dq-fail").count() == 1
        held = demo.locator("table.quarantine tr.held")
        assert held.count() == 1
        assert "V1A0000000000004" in held.inner_text()
        assert "missing channel" in held.inner_text()
        assert "<script>" in held.inner_text()  # shown as text, not run
        other = frame.locator('section[data-connection="other"]')
        assert other.locator("tr.run").count() == 1
        page.screenshot(path=str(ARTIFACTS / "plugin.png"), full_page=True)

        # The run's Data Docs page opens in place (the UI's iframe sandbox allows no pop-ups).
        first.locator("a.data-docs-run").click()
        docs = next_frame(page, "/validations/")
        heading = docs.wait_for_selector("h1", timeout=30_000)
        assert heading.inner_text() == "Validation of clinical_interaction__v in scheduled__2026-11-25T10:00:00+00:00"

        # Back to the page for the record lookup.
        page.goto(f"{api_server}/plugin/clinical-crm", wait_until="networkidle")
        frame = page.wait_for_selector("iframe", timeout=60_000).content_frame()
        frame.wait_for_selector("#lookup-source-id", timeout=30_000)

        # Record lookup through the form.
        frame.select_option("#lookup-connection", "demo")
        frame.fill("#lookup-source-id", "V1A0000000000003")
        frame.click("#lookup-submit")
        frame.wait_for_selector("#record-source-id", timeout=30_000)
        assert frame.locator("#record-source-id").inner_text() == "V1A0000000000003"
        outcome = frame.locator("table.outcomes tr.outcome")
        assert outcome.count() == 1
        assert "failed" in outcome.inner_text()
        assert "call_channel__v: unknown value" in outcome.inner_text()
        page.screenshot(path=str(ARTIFACTS / "plugin-record.png"), full_page=True)
    finally:
        page.close()


def console_frame(page, api_server: str):
    """The page inside the Airflow UI (its iframe), loaded."""
    page.goto(f"{api_server}/plugin/clinical-crm", wait_until="networkidle")
    frame = page.wait_for_selector("iframe", timeout=60_000).content_frame()
    frame.wait_for_selector("section.connection", timeout=60_000)
    return frame


def test_console_health_chart_and_links_to_the_airflow_run(api_server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        frame = console_frame(page, api_server)
        demo = frame.locator('section[data-connection="demo"]')
        health = demo.locator("p.health").inner_text()
        assert "Last run: success" in health and "Open quarantine: 1" in health
        assert "ctms_to_crm: last successful window end 2026-11-25 11:00:00, lag" in " ".join(health.split())
        assert demo.locator("svg.chart g.bar").count() == 3
        assert demo.locator("svg.chart rect.bar-loaded").first.bounding_box()["height"] > 0  # drawn, visible
        assert demo.locator("tr.gap").count() == 1
        page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
        trial = frame.locator('section[data-connection="trial"]')
        assert trial.locator("svg.chart g.bar").count() == 15 and trial.locator("tr.gap").count() == 1
        trial.locator("h2").evaluate("heading => heading.scrollIntoView({block: 'start'})")
        page.screenshot(path=str(ARTIFACTS / "console-chart.png"), full_page=True)

        # The run's link opens the DAG run in the Airflow UI itself (not inside the page's frame).
        demo.locator('tr.run[data-direction="ctms_to_crm"] a.airflow-run').click()
        page.wait_for_url("**/dags/ctms_to_crm__demo/runs/**", timeout=30_000)
        assert page.url.endswith("/dags/ctms_to_crm__demo/runs/scheduled__2026-11-25T10%3A00%3A00%2B00%3A00")
    finally:
        page.close()


def test_backfill_this_window_creates_an_airflow_backfill(api_server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    try:
        frame = console_frame(page, api_server)
        frame.locator('section[data-connection="demo"] tr.gap button.backfill-window').click()
        notice = frame.wait_for_selector("#notice", timeout=60_000).inner_text()
        assert "backfill" in notice and "crm_to_ctms__demo" in notice, notice
    finally:
        page.close()
    # Airflow's own REST API has it: the window of the missed crm_to_ctms hour.
    backfills = requests.get(f"{api_server}/api/v2/backfills", params={"dag_id": "crm_to_ctms__demo"},
                             timeout=30).json()["backfills"]
    assert len(backfills) == 1
    assert backfills[0]["from_date"].startswith("2026-11-25T09:50:00")
    assert backfills[0]["to_date"].startswith("2026-11-25T10:50:00")
    runs = requests.get(f"{api_server}/api/v2/dags/crm_to_ctms__demo/dagRuns", timeout=30).json()["dag_runs"]
    # its DAG run: the schedule's one point in the missed hour
    assert [(r["run_type"], r["logical_date"]) for r in runs] == [("backfill", "2026-11-25T10:00:00Z")]


def test_quarantine_triage_ignore_with_a_reason(api_server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        frame = console_frame(page, api_server)
        frame.locator('section[data-connection="demo"] a.triage').click()
        frame.wait_for_selector("#quarantine-total", timeout=30_000)
        held = frame.locator('tr.held[data-source-id="V1A0000000000004"]')
        held.locator("input.ignore-reason").fill("a test record, never to be sent")
        page.screenshot(path=str(ARTIFACTS / "console-quarantine.png"), full_page=True)
        held.locator("button.ignore").click()
        frame.wait_for_selector("#notice", timeout=30_000)
        assert "V1A0000000000004: ignored for good" in frame.locator("#notice").inner_text()
        assert frame.locator("#quarantine-total").inner_text() == "0"

        # The record's history shows the decision and who took it.
        frame.select_option("#lookup-connection", "demo")
        frame.fill("#lookup-source-id", "V1A0000000000004")
        frame.click("#lookup-submit")
        action = frame.wait_for_selector("table.record-actions tr.action", timeout=30_000).inner_text()
        assert "ignore" in action and "a test record, never to be sent" in action
        assert frame.locator("td.actor").inner_text() == "Anonymous"  # the user of the all-admins mode
        page.screenshot(path=str(ARTIFACTS / "console-record-decision.png"), full_page=True)
    finally:
        page.close()


def test_quarantine_triage_retry_all_the_filter_shows(api_server, browser):
    """The bulk form through the real api-server (its login, the same-origin check): every record
    the filter shows gets a decision of its own, and a retry keeps them quarantined."""
    from clinical_crm.engine.ledger import Ledger

    ledger = Ledger(LEDGER["url"])
    run = ledger.recent_runs("trial", limit=1)[0]["run_id"]
    ledger.quarantine_records(run, "trial", "ctms_to_crm", "clinical_interaction__v",
                              {f"T{i}": ["no CRM account for person"] for i in range(3)})
    ledger.quarantine_records(run, "trial", "ctms_to_crm", "clinical_interaction__v", {"U1": ["missing channel"]})
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        frame = console_frame(page, api_server)
        frame.locator('section[data-connection="trial"] a.triage').click()
        frame.wait_for_selector("#quarantine-total", timeout=30_000)
        frame.fill("#filter-rule", "no CRM account")
        frame.click("#filter-submit")
        frame.wait_for_url("**rule=no+CRM+account**", timeout=30_000)
        frame.wait_for_selector("#retry-all", timeout=30_000)
        assert frame.locator("#retry-all").inner_text() == "Retry all 3 in the next run"
        frame.click("#retry-all")
        frame.wait_for_selector("#notice", timeout=30_000)
        assert "3 records will be read again in the next run" in frame.locator("#notice").inner_text()
        assert frame.locator("#quarantine-total").inner_text() == "3"  # still held: read again
        assert frame.locator("#filter-rule").input_value() == "no CRM account"  # back to the same filter
    finally:
        page.close()
    decided = {s: [a["action"] for a in ledger.record_history("trial", s)["actions"]] for s in ("T0", "T1", "T2", "U1")}
    assert decided == {"T0": ["retry"], "T1": ["retry"], "T2": ["retry"], "U1": []}


def token_for(name: str, role: str, monkeypatch) -> str:
    """An Airflow token of a simple-auth-manager user with this role, signed as the api-server signs."""
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
    return create_auth_manager().generate_jwt(SimpleAuthManagerUser(username=name, role=role))


def test_actions_on_the_api_server_need_edit_permission_on_the_dag(api_server, monkeypatch):
    """Through the real api-server and Airflow's own login: a viewer is refused, an editor's
    action is recorded under their name."""
    def post(path: str, token: str, data: dict) -> requests.Response:
        return requests.post(f"{api_server}/clinical-crm/{path}", data=data, timeout=60, allow_redirects=False,
                             headers={"Authorization": f"Bearer {token}", "Origin": api_server})

    viewer, editor = token_for("vic", "viewer", monkeypatch), token_for("erin", "user", monkeypatch)
    held = requests.get(f"{api_server}/clinical-crm/record", timeout=60,
                        params={"connection": "demo", "source_id": "V1A0000000000004"},
                        headers={"Authorization": f"Bearer {viewer}"})
    assert held.status_code == 200 and "actions need edit permission on DAG ctms_to_crm__demo" in held.text
    row_id = int(re.search(r'name="quarantine_id" value="(\d+)"', requests.get(
        f"{api_server}/clinical-crm/record", params={"connection": "demo", "source_id": "V1A0000000000004"},
        headers={"Authorization": f"Bearer {editor}"}, timeout=60).text).group(1))

    assert post("quarantine/action", viewer, {"quarantine_id": row_id, "action": "retry"}).status_code == 403
    assert post("backfill", viewer, {"connection": "demo", "direction": "ctms_to_crm",
                                     "window_start": "2026-11-25T09:50:00+00:00",
                                     "window_end": "2026-11-25T11:00:00+00:00"}).status_code == 403
    assert requests.get(f"{api_server}/api/v2/backfills", params={"dag_id": "ctms_to_crm__demo"},
                        timeout=30).json()["backfills"] == []
    done = post("quarantine/action", editor, {"quarantine_id": row_id, "action": "retry"})
    assert done.status_code == 303, done.text
    history = requests.get(f"{api_server}/clinical-crm/record", timeout=60,
                           params={"connection": "demo", "source_id": "V1A0000000000004"},
                           headers={"Authorization": f"Bearer {editor}"}).text
    assert re.search(r'<tr class="action">.*?retry in the next run.*?<td class="actor">erin</td>', history, re.S)
