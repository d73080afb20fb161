"""Burst limit headers and delay, request counters, and each injected fault kind, over real HTTP."""
from __future__ import annotations

import pytest
import requests

from vault_http import API, Client

ACT = "crm_activity__v"
Q = "SELECT id FROM study__v"


@pytest.fixture(autouse=True)
def clean_faults(ctms):
    ctms.admin.faults(rate=0, queue=[], kinds=["exception", "http502", "http503", "drop", "slow",
                                               "session_expiry", "race_condition"], slow_seconds=3)
    yield
    ctms.admin.faults(rate=0, queue=[])
    ctms.admin.limits(burst_limit=2000, burst_delay_ms=500, reset_windows=True)


def test_burst_headers_on_every_response(ctms_client):
    ctms_client.query(Q)
    first = ctms_client.request("POST", f"/api/{API}/query", data={"q": Q})
    second = ctms_client.request("GET", f"/api/{API}/metadata/vobjects/study__v")
    assert first.headers["X-VaultAPI-BurstLimit"] == "2000"
    assert int(second.headers["X-VaultAPI-BurstLimitRemaining"]) == \
        int(first.headers["X-VaultAPI-BurstLimitRemaining"]) - 1
    failed = requests.post(f"{ctms_client.url}/api/{API}/query", data={"q": Q}, timeout=10)
    assert "X-VaultAPI-BurstLimitRemaining" in failed.headers


def test_past_the_burst_limit_calls_are_delayed_not_refused(ctms, ctms_client):
    ctms.admin.limits(burst_limit=3, burst_delay_ms=50, reset_windows=True)
    responses = [ctms_client.request("POST", f"/api/{API}/query", data={"q": Q}) for _ in range(5)]
    assert [r.headers["X-VaultAPI-BurstLimitRemaining"] for r in responses] == ["2", "1", "0", "0", "0"]
    assert [r.headers.get("X-VaultAPI-ResponseDelay") for r in responses] == [None, None, None, "50", "50"]
    assert all(r.json()["responseStatus"] == "SUCCESS" for r in responses)


def test_counters_per_endpoint_auth_apart_admin_not_counted(ctms, ctms_client):
    ctms.admin.reset_counters()
    ctms_client.query(Q)
    ctms_client.query(Q)
    ctms_client.request("GET", f"/api/{API}/vobjects/study__v/nope")
    Client(ctms.url).login()
    ctms.admin.faults()
    counters = ctms.admin.counters()
    assert counters["endpoints"] == {"POST /api/{version}/query": 2, "GET /api/{version}/vobjects/study__v/{id}": 1}
    assert counters["auth"] == 1 and counters["total"] == 3


def test_exception_fault(ctms, ctms_client):
    ctms.admin.faults(queue=["exception"])
    body = ctms_client.query(Q)
    assert body["responseStatus"] == "EXCEPTION" and body["errors"][0]["type"] == "UNEXPECTED_ERROR"
    assert ctms_client.query(Q)["responseStatus"] == "SUCCESS"
    assert ctms.admin.counters()["faults"]["exception"] >= 1


@pytest.mark.parametrize("kind, status", [("http502", 502), ("http503", 503)])
def test_http_error_faults(ctms, ctms_client, kind, status):
    ctms.admin.faults(queue=[kind])
    response = ctms_client.request("POST", f"/api/{API}/query", data={"q": Q})
    assert response.status_code == status
    assert "X-VaultAPI-BurstLimit" in response.headers


def test_dropped_connection(ctms, ctms_client):
    ctms.admin.faults(queue=["drop"])
    with pytest.raises(requests.ConnectionError):
        ctms_client.request("POST", f"/api/{API}/query", data={"q": Q})
    assert ctms_client.query(Q)["responseStatus"] == "SUCCESS"


def test_slow_response(ctms, ctms_client):
    ctms.admin.faults(queue=["slow"], slow_seconds=2)
    with pytest.raises(requests.Timeout):
        ctms_client.request("POST", f"/api/{API}/query", data={"q": Q}, timeout=0.5)


def test_forced_session_expiry(ctms, ctms_client):
    ctms.admin.faults(queue=["session_expiry"])
    assert ctms_client.query(Q)["errors"][0]["type"] == "INVALID_SESSION_ID"
    assert ctms_client.query(Q)["errors"][0]["type"] == "INVALID_SESSION_ID"    # the session is really gone
    ctms_client.login()
    assert ctms_client.query(Q)["responseStatus"] == "SUCCESS"


@pytest.mark.parametrize("kind", ["exception", "http502", "http503", "drop", "session_expiry"])
def test_a_faulted_write_applies_nothing(ctms, ctms_client, kind):
    ctms.admin.faults(queue=[kind])
    try:
        response = ctms_client.request("POST", f"/api/{API}/vobjects/study__v", json=[{"name__v": f"FAULT-{kind}"}])
        assert response.status_code != 200 or response.json()["responseStatus"] != "SUCCESS"
    except requests.ConnectionError:
        assert kind == "drop"
    ctms_client.login()
    assert ctms_client.query(f"SELECT id FROM study__v WHERE name__v = 'FAULT-{kind}'")["data"] == []


def test_race_condition_fails_only_that_record(ctms, ctms_client):
    ctms.admin.faults(queue=["race_condition"])
    body = ctms_client.write("POST", "study__v", [{"name__v": "RACE-1"}, {"name__v": "RACE-2"}])
    assert body["responseStatus"] == "SUCCESS"
    assert body["data"][0]["errors"][0]["type"] == "RACE_CONDITION"
    assert body["data"][1]["responseStatus"] == "SUCCESS"
    names = {r["name__v"] for r in ctms_client.query(
        "SELECT name__v FROM study__v WHERE name__v CONTAINS ('RACE-1', 'RACE-2')")["data"]}
    assert names == {"RACE-2"}


def test_seeded_fault_rate_repeats(ctms, ctms_client):
    def outcomes():
        ctms.admin.faults(rate=0.5, kinds=["exception"], seed=42)
        return [ctms_client.query(Q)["responseStatus"] for _ in range(16)]

    first, second = outcomes(), outcomes()
    assert first == second
    assert set(first) == {"SUCCESS", "EXCEPTION"}


def test_bad_fault_kind_is_refused(ctms):
    body = ctms.admin.faults(kinds=["meteor"])
    assert body["responseStatus"] == "FAILURE"


def test_faults_configured_at_start(tmp_path):
    from vault_sandbox.testing import SandboxServer

    with SandboxServer("crm", tmp_path / "crm.db", seed="demo", fault_rate=1.0, fault_kinds=["http503"],
                       fault_seed=3, burst_limit=77) as server:
        client = Client(server.url)
        response = client.request("POST", f"/api/{API}/query", data={"q": "SELECT id FROM account__v"})
        assert response.status_code == 503
        assert response.headers["X-VaultAPI-BurstLimit"] == "77"
        assert server.admin.faults()["kinds"] == ["http503"] and server.admin.faults()["seed"] == 3
        server.admin.faults(rate=0)
        assert client.query("SELECT id FROM account__v")["responseStatus"] == "SUCCESS"
