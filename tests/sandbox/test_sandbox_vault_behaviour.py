"""The sandbox plays Vault's reference ids, session cap, login limit window, maintenance windows and
the deletions API's page limit (docs/sandbox.md → "Vault behaviours played"), over HTTP."""
from __future__ import annotations

import time

from vault_http import API, Client

DOWNTIME = "X-VaultAPI-DowntimeExpectedDurationMinutes"
STUDIES = "SELECT id FROM study__v"


def test_the_reference_id_of_every_call_is_recorded(ctms):
    ctms.admin.reset_counters()
    client = Client(ctms.url)
    client.http.headers["X-VaultAPI-ReferenceID"] = "demo:ctms_to_crm__demo:manual-1:extract:1"
    client.login()
    client.query(STUDIES)
    client.request("POST", f"/api/{API}/keep-alive")
    Client(ctms.url).query(STUDIES)   # a call without the header: its login and query
    references = ctms.admin.counters()["references"]
    assert references == {"demo:ctms_to_crm__demo:manual-1:extract:1": 3, "": 2}


def test_a_session_ends_at_its_cap_whatever_the_activity(ctms):
    ctms.admin.limits(session_max_seconds=1)
    try:
        client = Client(ctms.url)
        client.login()
        ctms.admin.reset_counters()
        assert client.query(STUDIES)["responseStatus"] == "SUCCESS"
        time.sleep(1.2)   # past the cap, though well within the idle timeout
        assert client.query(STUDIES)["errors"][0]["type"] == "INVALID_SESSION_ID"
        assert ctms.admin.counters()["invalid_session"] == 1
    finally:
        ctms.admin.limits(session_max_seconds=48 * 3600)


def test_the_login_limit_is_per_user_and_its_window_configurable(ctms):
    ctms.admin.limits(auth_limit=1, auth_window_seconds=1, reset_windows=True)
    try:
        time.sleep(1.02 - time.time() % 1)   # the start of a window: the logins below share it
        first, second = Client(ctms.url).login(), Client(ctms.url).login()
        assert first["responseStatus"] == "SUCCESS"
        assert second["errors"][0]["type"] == "API_LIMIT_EXCEEDED"   # refused, not slowed
        assert Client(ctms.url, username="clinops@sandbox.example").login()["responseStatus"] == "SUCCESS"
        time.sleep(1.05 - time.time() % 1)   # the next one-second window
        assert Client(ctms.url).login()["responseStatus"] == "SUCCESS"
    finally:
        ctms.admin.limits(auth_limit=120, auth_window_seconds=60, reset_windows=True)


def test_a_maintenance_window_answers_errors_with_the_expected_duration(ctms, ctms_client):
    ctms.admin.reset_counters()
    started = ctms.admin.downtime(minutes=0.5)
    try:
        assert 0 < started["minutes_left"] <= 0.5
        answer = ctms_client.request("POST", f"/api/{API}/query", data={"q": STUDIES})
        assert answer.status_code == 503
        assert answer.json()["responseStatus"] == "FAILURE"
        assert 0 < float(answer.headers[DOWNTIME]) <= 0.5
        login = Client(ctms.url).http.post(f"{ctms.url}/api/{API}/auth",
                                           data={"username": "integration@sandbox.example", "password": "sandbox"})
        assert login.status_code == 503 and DOWNTIME in login.headers
        assert ctms.admin.counters()["maintenance"] == 2
    finally:
        ctms.admin.downtime(minutes=0)
    assert ctms.admin.downtime()["minutes_left"] is None
    assert ctms_client.query(STUDIES)["responseStatus"] == "SUCCESS"


def test_a_maintenance_window_ends_by_itself(ctms, ctms_client):
    ctms.admin.downtime(seconds=0.5)
    assert ctms_client.request("POST", f"/api/{API}/query", data={"q": STUDIES}).status_code == 503
    time.sleep(0.6)
    assert ctms_client.query(STUDIES)["responseStatus"] == "SUCCESS"


def test_deletions_take_a_limit_up_to_5000(ctms_client):
    path = f"/api/{API}/objects/deletions/vobjects/crm_activity__v"
    assert ctms_client.request("GET", path).json()["responseDetails"]["limit"] == 1000
    assert ctms_client.request("GET", path, params={"limit": 5000}).json()["responseDetails"]["limit"] == 5000
    assert ctms_client.request("GET", path, params={"limit": 9999}).json()["responseDetails"]["limit"] == 5000
