"""Authentication, sessions, the auth limit and refusal of unauthenticated calls, over real HTTP."""
from __future__ import annotations

import time

import pytest
import requests

from vault_http import API, Client


def test_versions_are_public(ctms):
    body = requests.get(f"{ctms.url}/api/", timeout=10).json()
    assert body["responseStatus"] == "SUCCESS"
    assert "v25.2" in body["values"]


def test_login_returns_session_and_vault(ctms):
    body = Client(ctms.url).login()
    assert body["responseStatus"] == "SUCCESS"
    assert body["vaultId"] == 1001 and body["userId"].startswith("V1")
    assert body["sessionId"]


def test_wrong_password_is_refused(ctms):
    body = Client(ctms.url, password="wrong").login()
    assert body["responseStatus"] == "FAILURE"
    assert body["errors"][0]["type"] == "USERNAME_OR_PASSWORD_INCORRECT"


@pytest.mark.parametrize("method, path", [
    ("POST", f"/api/{API}/query"),
    ("GET", f"/api/{API}/query/abc?pageoffset=10"),
    ("POST", f"/api/{API}/vobjects/crm_activity__v"),
    ("GET", f"/api/{API}/metadata/vobjects/crm_activity__v"),
    ("GET", f"/api/{API}/objects/deletions/vobjects/crm_activity__v"),
    ("GET", f"/api/{API}/objects/users/me/permissions"),
    ("POST", f"/api/{API}/keep-alive"),
    ("GET", "/sandbox/counters"),
    ("POST", "/sandbox/faults"),
])
@pytest.mark.parametrize("authorization", [None, "not-a-session"])
def test_calls_without_a_valid_session_are_refused(ctms, method, path, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    response = requests.request(method, f"{ctms.url}{path}", headers=headers, timeout=10,
                                data={"q": "SELECT id FROM study__v"})
    assert response.status_code == 200
    body = response.json()
    assert body["responseStatus"] == "FAILURE"
    assert body["errors"][0]["type"] == "INVALID_SESSION_ID"


def test_bearer_prefix_keep_alive_and_end_session(ctms_client):
    ok = ctms_client.request("POST", f"/api/{API}/keep-alive",
                             headers={"Authorization": f"Bearer {ctms_client.session_id}"}).json()
    assert ok["responseStatus"] == "SUCCESS"
    assert ctms_client.request("DELETE", f"/api/{API}/session").json()["responseStatus"] == "SUCCESS"
    after = ctms_client.query("SELECT id FROM study__v")
    assert after["errors"][0]["type"] == "INVALID_SESSION_ID"


def test_forced_expiry_then_reauthentication(ctms, ctms_client):
    assert ctms_client.query("SELECT id FROM study__v")["responseStatus"] == "SUCCESS"
    assert ctms.admin.expire_sessions() >= 1
    assert ctms_client.query("SELECT id FROM study__v")["errors"][0]["type"] == "INVALID_SESSION_ID"
    assert ctms_client.login()["responseStatus"] == "SUCCESS"
    assert ctms_client.query("SELECT id FROM study__v")["responseStatus"] == "SUCCESS"


def test_idle_session_expires(ctms, ctms_client):
    ctms.admin.limits(session_idle_seconds=1)
    try:
        assert ctms_client.query("SELECT id FROM study__v")["responseStatus"] == "SUCCESS"
        time.sleep(1.5)   # longer than the idle timeout: the session must be gone
        assert ctms_client.query("SELECT id FROM study__v")["errors"][0]["type"] == "INVALID_SESSION_ID"
    finally:
        ctms.admin.limits(session_idle_seconds=1200)


def test_auth_limit_per_minute(ctms):
    ctms.admin.limits(auth_limit=3, reset_windows=True)
    try:
        results = [Client(ctms.url).login() for _ in range(4)]
        assert [r["responseStatus"] for r in results[:3]] == ["SUCCESS"] * 3
        assert results[3]["responseStatus"] == "FAILURE"
        assert results[3]["errors"][0]["type"] == "API_LIMIT_EXCEEDED"
    finally:
        ctms.admin.limits(auth_limit=120, reset_windows=True)


def test_end_users_have_their_profiles(ctms):
    for username in ["clinops@sandbox.example", "readonly@sandbox.example", "noaccess@sandbox.example"]:
        assert Client(ctms.url, username=username).login()["responseStatus"] == "SUCCESS"


def test_state_survives_a_restart(tmp_path):
    from vault_sandbox.testing import SandboxServer

    db = tmp_path / "restart.db"
    with SandboxServer("crm", db, seed="demo") as server:
        client = Client(server.url)
        created = client.write("POST", "clinical_study__v", [{"external_id__v": "1001_KEEP", "name__v": "Keep me"}],
                               id_param="external_id__v")
        record_id = created["data"][0]["data"]["id"]
    with SandboxServer("crm", db, seed="demo") as server:   # an existing database is not re-seeded
        body = Client(server.url).request("GET", f"/api/{API}/vobjects/clinical_study__v/{record_id}").json()
        assert body["data"]["external_id__v"] == "1001_KEEP"


def test_unknown_paths_and_methods_answer_with_an_envelope(ctms_client):
    unknown = ctms_client.request("GET", f"/api/{API}/no/such/thing")
    assert unknown.status_code == 200 and unknown.json()["errors"][0]["type"] == "MALFORMED_URL"
    wrong = ctms_client.request("PATCH", f"/api/{API}/vobjects/study__v")
    assert wrong.status_code == 200 and wrong.json()["errors"][0]["type"] == "METHOD_NOT_SUPPORTED"
