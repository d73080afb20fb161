"""The data engineers' page in a real browser, inside a real Airflow api-server.

Starts `airflow api-server` (temporary AIRFLOW_HOME, SQLite, simple auth manager with everyone
admin) with a ledger filled through its write API, then drives Debian's chromium headless through
playwright: the page is listed in the Airflow UI, shows the runs and the quarantine, and the record
lookup works. The screenshot is kept in test-artifacts/plugin.png.
"""
from __future__ import annotations

import os
import secrets
import shutil
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
    port = free_port()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "CLINICAL_CRM_LEDGER_URL": ledger_url,
        "CLINICAL_CRM_REPORTS_DIR": str(reports),
    }
    env.pop("AIRFLOW_CONFIG", None)
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    migrate = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
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
        assert demo.locator("tr.run").count() == 2
        first = demo.locator('tr.run[data-dag-run-id="scheduled__2026-11-25T10:00:00+00:00"]')
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
        assert heading.inner_text() == "Validation of scheduled__2026-11-25T10:00:00+00:00"

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
