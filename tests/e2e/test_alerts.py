"""Alerts end to end: dag.test() runs against the sandbox vaults send their alerts through
Airflow's SMTP provider to a local SMTP server (aiosmtpd) started here; the tests read the
messages it received.

The connection file `alerts.yaml` (a copy of the demo with an `alerts:` section, its own name and
so its own ledger history) is written per test; its DAGs are built from it directly.
"""
from __future__ import annotations

import email
import email.policy
import json
import re
import socket
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from clinical_crm.vault.client import VaultClient
from support import REPO, vault_conn

pytestmark = pytest.mark.usefixtures("airflow_db")

BASE_URL = "http://airflow.example.test:8080"
RECIPIENT = "data-ops@example.test"


class Inbox:
    """aiosmtpd handler: keeps every message received."""

    def __init__(self):
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def take(self) -> list[dict]:
        """The messages received since the last take: subject, recipients and plain body."""
        taken = [{"subject": m["Subject"], "to": m["To"], "from": m["From"],
                  "body": m.get_body(("html", "plain")).get_content(), "raw": m.as_string()} for m in self.messages]
        self.messages.clear()
        return taken


@pytest.fixture(scope="module")
def inbox(monkeypatch_module):
    from aiosmtpd.controller import Controller

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    monkeypatch_module.setenv("AIRFLOW_CONN_SMTP_ALERTS",
                              f"smtp://127.0.0.1:{port}?disable_tls=true&disable_ssl=true&timeout=10&retry_limit=0")
    monkeypatch_module.setenv("AIRFLOW__API__BASE_URL", BASE_URL)
    yield handler
    controller.stop()


@pytest.fixture
def connection_file(tmp_path, monkeypatch):
    """Writes the connection file `alerts.yaml` (the demo with `alerts:`) as the only connection,
    with a fresh ledger and reports folder."""
    folder = tmp_path / "connections"
    folder.mkdir()
    monkeypatch.setenv("CLINICAL_CRM_CONNECTIONS_DIR", str(folder))
    monkeypatch.setenv("CLINICAL_CRM_DATA_DIR", str(tmp_path / "data"))

    def write(enabled: bool = True, **alerts):
        data = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
        data["name"] = "alerts"
        if enabled:
            data["alerts"] = {"smtp_conn_id": "smtp_alerts", "to": [RECIPIENT], "from": "clinical-crm@example.test",
                              **alerts}
        (folder / "alerts.yaml").write_text(yaml.safe_dump(data))

    return write


def run(flow_name: str, days: int = 30):
    from clinical_crm.airflow.dag_factory import build_dags

    now = datetime.now(timezone.utc)
    return build_dags()[f"{flow_name}__alerts"].test(
        run_conf={"window_start": (now - timedelta(days=days)).isoformat(), "window_end": now.isoformat()},
        logical_date=now)


def personal_emails(vaults) -> set[str]:
    found = set()
    for server, objects in zip(vaults, (("person__sys", "user__sys"), ("user__sys",))):
        client = VaultClient(server.url, "integration@sandbox.example", "sandbox")
        for obj in objects:
            found |= {r["email__sys"] for page in client.query(f"SELECT email__sys FROM {obj}")
                      for r in page.records if r.get("email__sys")}
        client.close()
    return found


def assert_no_personal_data(message: dict, emails: set[str]):
    assert "@" not in message["body"], message["body"]
    for address in emails:
        assert address not in message["raw"]
    assert "sandbox" not in message["body"]  # no password


def test_quarantine_and_lag_alerts(vaults, inbox, connection_file):
    emails = personal_emails(vaults)
    connection_file(quarantine_threshold=0, max_lag_minutes=60)
    dr = run("ctms_to_crm")
    assert dr.state == "success"
    sent = inbox.take()
    assert len(sent) == 2
    lag = next(m for m in sent if "no successful window" in m["subject"])
    assert lag["subject"].startswith("[clinical-crm] ctms_to_crm__alerts: no successful window for ")
    assert "Last successful window end: 2026-01-01T00:00:00+00:00" in lag["body"]
    quarantined = next(m for m in sent if "newly quarantined" in m["subject"])
    assert re.search(r"ctms_to_crm__alerts: \d+ records newly quarantined \(threshold 0\)", quarantined["subject"])
    body = quarantined["body"]
    assert "DAG: ctms_to_crm__alerts" in body and f"Run: {dr.run_id}" in body
    assert re.search(r"Window: \S+ \.\. \S+", body)
    assert "person_account_match: " in body and ".quarantine.csv" in body
    assert f"Airflow: {BASE_URL}/dags/ctms_to_crm__alerts/runs/" in body
    for message in sent:
        assert message["to"] == RECIPIENT and message["from"] == "clinical-crm@example.test"
        assert_no_personal_data(message, emails)


def test_old_quarantine_alert_once_a_day(vaults, inbox, connection_file):
    from sqlalchemy import text

    from clinical_crm.engine.ledger import Ledger

    connection_file(quarantine_max_age_days=2)
    assert run("ctms_to_crm").state == "success"
    assert inbox.take() == []  # held, but not for two days yet
    with Ledger().engine.begin() as db:  # the records have been held for three days
        db.execute(text("UPDATE quarantine SET first_seen = :at WHERE connection = 'alerts'"),
                   {"at": datetime.now(timezone.utc) - timedelta(days=3)})
    assert run("ctms_to_crm").state == "success"
    [old] = inbox.take()
    assert re.search(r"ctms_to_crm__alerts: \d+ records quarantined for more than 2 days", old["subject"])
    assert "crm_activity__v " in old["body"] and "(since " in old["body"]
    assert_no_personal_data(old, personal_emails(vaults))
    assert run("ctms_to_crm").state == "success"
    assert inbox.take() == []  # told once a day, not every run


def test_failed_run_alert(vaults, inbox, connection_file, monkeypatch):
    ctms, _ = vaults
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn(ctms.url, password="wrong-password"))
    connection_file()
    dr = run("crm_to_ctms")
    assert dr.state == "failed"
    [failed] = inbox.take()
    assert failed["subject"] == "[clinical-crm] crm_to_ctms__alerts: run failed in task extract"
    body = failed["body"]
    assert "DAG: crm_to_ctms__alerts" in body and "Task: extract" in body and f"Run: {dr.run_id}" in body
    assert re.search(r"Window: 20\d\d-\S+ \.\. 20\d\d-\S+", body)
    assert "Reason: VaultAuthenticationError" in body
    assert f"Airflow: {BASE_URL}/dags/crm_to_ctms__alerts/runs/" in body and body.count("/tasks/extract") == 1
    assert "wrong-password" not in failed["raw"]
    assert_no_personal_data(failed, personal_emails(vaults))


def test_failed_reconciliation_alert(vaults, inbox, connection_file, monkeypatch):
    from clinical_crm.airflow.dag_factory import build_dags

    ctms, _ = vaults
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn(ctms.url, password="wrong-password"))
    connection_file()
    dr = build_dags()["reconcile__alerts"].test(logical_date=datetime.now(timezone.utc))
    assert dr.state == "failed"
    sent = inbox.take()
    assert sorted(m["subject"] for m in sent) == [  # each flow's task reads both vaults
        "[clinical-crm] reconcile__alerts: run failed in task reconcile_crm_to_ctms",
        "[clinical-crm] reconcile__alerts: run failed in task reconcile_ctms_to_crm"]
    for message in sent:
        assert f"Run: {dr.run_id}" in message["body"] and "Reason: VaultAuthenticationError" in message["body"]
        assert f"Airflow: {BASE_URL}/dags/reconcile__alerts/runs/" in message["body"]
        assert "wrong-password" not in message["raw"]


@pytest.fixture
def slack(monkeypatch):
    """A local stand-in for Slack's incoming webhook: keeps the JSON bodies posted to it."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    posted: list[dict] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self):
            posted.append({"path": self.path, **json.loads(self.rfile.read(int(self.headers["Content-Length"])))})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", json.dumps(
        {"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{server.server_port}", "password": "T000/B000/XXXX"}))
    yield posted
    server.shutdown()


def test_failed_run_alert_to_slack_and_email(vaults, inbox, slack, connection_file, monkeypatch):
    ctms, _ = vaults
    monkeypatch.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn(ctms.url, password="wrong-password"))
    connection_file(slack_webhook_conn_id="slack_alerts")
    dr = run("crm_to_ctms")
    assert dr.state == "failed"
    [message] = slack
    assert message["path"] == "/T000/B000/XXXX"
    assert message["text"].startswith("[clinical-crm] crm_to_ctms__alerts: run failed in task extract\n")
    assert f"Run: {dr.run_id}" in message["text"] and "Reason: VaultAuthenticationError" in message["text"]
    assert "@" not in message["text"] and "wrong-password" not in message["text"]
    [email_alert] = inbox.take()  # the same alert by email
    assert email_alert["subject"] == "[clinical-crm] crm_to_ctms__alerts: run failed in task extract"


def test_no_alerts_section_sends_nothing(vaults, inbox, connection_file):
    connection_file(enabled=False)
    assert run("ctms_to_crm").state == "success"
    assert inbox.take() == []
