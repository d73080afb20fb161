"""The client honours Vault's documented API behaviour, against the sandbox over HTTP: reference ids,
keep-alive and the 48-hour cap, the login limit, maintenance windows and deletions with limit=5000.

Waits are short configured windows (an idle timeout or cap of a second or two) and the
assertions are on counters (the client's and the sandbox's), never on how long anything took.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests

from clinical_crm.vault import reference
from clinical_crm.vault.client import VaultClient
from clinical_crm.vault.errors import VaultMaintenanceError

from vault_sandbox.seed import DEMO_PASSWORD as PASSWORD, INTEGRATION_USER

STUDIES = "SELECT id FROM study__v"
KEEP_ALIVE = "POST /api/{version}/keep-alive"
DELETIONS = "GET /api/{version}/objects/deletions/vobjects/crm_activity__v"


def counters(server) -> dict:
    return server.admin.counters()


# -- reference ids ------------------------------------------------------------------------------

def test_run_prefix_and_task_reference_follow_the_rules():
    prefix = reference.run_prefix("demo", "ctms_to_crm__demo", "manual__2026-12-04T18:16:22.123456+00:00")
    assert prefix == "demo:ctms_to_crm__demo:manual__2026-12-04T18-16-22.123456-00-00"
    task = reference.task_reference(prefix, "extract", 2)
    assert task == prefix + ":extract:2"
    long_prefix = reference.run_prefix("c" * 40, "ctms_to_crm__" + "c" * 40, "manual__2026-12-04T18:16:22+00:00")
    assert len(long_prefix) == reference.RUN_PREFIX_MAX and long_prefix[-9] == "~"
    assert long_prefix != reference.run_prefix("c" * 40, "ctms_to_crm__" + "c" * 40, "manual__2026-12-04T18:16:23+00:00")
    long_task = reference.task_reference(long_prefix, "t" * 200, 123456)
    assert long_task.startswith(long_prefix + ":") and len(long_task) <= reference.MAX_LENGTH
    assert reference.clean("a b\r\nc+d/é") == "a-b-c-d"  # each run of unsafe characters: one "-"
    assert reference.clean("x" * 300).startswith("x" * 50) and len(reference.clean("x" * 300)) == reference.MAX_LENGTH


def test_every_call_carries_the_reference_id(ctms, make_client):
    ctms.admin.reset_counters()
    client = make_client(reference_id="demo:ctms_to_crm__demo:run-1:extract:1")
    list(client.query(STUDIES))
    client.keep_alive()
    client.close()   # the session's end is a call too
    assert counters(ctms)["references"] == {"demo:ctms_to_crm__demo:run-1:extract:1": 4}
    # no vault sends a daily limit since v21.1: never required, None when absent
    assert client.limits.daily_limit is None and client.limits.burst_remaining is not None


def test_the_hook_builds_the_reference_id_from_the_task_context(ctms, monkeypatch):
    import airflow.sdk

    from clinical_crm.airflow.hooks import VaultHook

    monkeypatch.setenv("AIRFLOW_CONN_VAULT_REF_TEST", json.dumps({
        "conn_type": "veeva_vault", "host": ctms.url, "login": INTEGRATION_USER, "password": PASSWORD,
        "extra": {"keep_alive_seconds": "300", "maintenance_max_wait": 120}}))
    hook = VaultHook("vault_ref_test", connection="demo")
    client = hook.get_client()
    assert client.reference_id is None   # no task running: none (nothing fails)
    assert (client.keep_alive_seconds, client.maintenance_max_wait) == (300.0, 120.0)
    client.close()

    class TaskInstance:
        dag_id, task_id, try_number = "ctms_to_crm__demo", "load", 3

    monkeypatch.setattr(airflow.sdk, "get_current_context",
                        lambda: {"ti": TaskInstance(), "run_id": "scheduled__2026-12-04T18:00:00+00:00"})
    client = VaultHook("vault_ref_test", connection="demo").get_client()
    assert client.reference_id == "demo:ctms_to_crm__demo:scheduled__2026-12-04T18-00-00-00-00:load:3"
    client.close()
    given = VaultHook("vault_ref_test", reference_id="my-own-id").get_client()
    assert given.reference_id == "my-own-id"
    given.close()


# -- sessions: keep-alive, the 48-hour cap ------------------------------------------------------

def test_keep_alive_holds_the_session_through_an_idle_gap(ctms, make_client):
    ctms.admin.limits(session_idle_seconds=1.0)
    try:
        client = make_client(keep_alive_seconds=0.3)
        list(client.query(STUDIES))
        ctms.admin.reset_counters()
        time.sleep(1.6)   # an idle gap longer than the vault's idle timeout, inside one task
        list(client.query(STUDIES))
        seen = counters(ctms)
        assert seen["endpoints"].get(KEEP_ALIVE, 0) >= 1
        assert seen["invalid_session"] == 0 and seen["auth"] == 0   # no failed call, no new login
        assert client.counters["reauth"] == 0 and client.counters["auth"] == 1
    finally:
        ctms.admin.limits(session_idle_seconds=1200)


def test_keep_alive_never_logs_in(ctms, make_client):
    """A client left open must not hold sessions forever: a keep-alive that finds the session gone
    drops it, and only the next call logs in."""
    client = make_client(keep_alive_seconds=0.2)
    list(client.query(STUDIES))
    ctms.admin.expire_sessions()
    ctms.admin.reset_counters()
    time.sleep(0.8)   # several keep-alive periods
    seen = counters(ctms)
    assert seen["endpoints"].get(KEEP_ALIVE, 0) == 1 and seen["auth"] == 0
    list(client.query(STUDIES))
    assert counters(ctms)["auth"] == 1 and counters(ctms)["invalid_session"] == 1


def test_without_keep_alive_the_idle_session_is_renewed_after_a_failed_call(ctms, make_client):
    """The behaviour keep-alive avoids (the same gap with keep-alive off)."""
    ctms.admin.limits(session_idle_seconds=1.0)
    try:
        client = make_client(keep_alive_seconds=0)
        list(client.query(STUDIES))
        ctms.admin.reset_counters()
        time.sleep(1.3)
        list(client.query(STUDIES))
        assert counters(ctms)["invalid_session"] == 1 and client.counters["reauth"] == 1
    finally:
        ctms.admin.limits(session_idle_seconds=1200)


def test_the_session_is_renewed_before_the_cap_without_a_failed_call(ctms, make_client):
    ctms.admin.limits(session_max_seconds=2.0)
    try:
        client = make_client(session_max_seconds=2.0)   # renewed after 1.8 s
        list(client.query(STUDIES))
        ctms.admin.reset_counters()
        time.sleep(1.85)
        list(client.query(STUDIES))
        seen = counters(ctms)
        assert client.counters["session_renewed"] == 1 and client.counters["reauth"] == 0
        assert seen["invalid_session"] == 0 and seen["auth"] == 1
    finally:
        ctms.admin.limits(session_max_seconds=48 * 3600)


# -- the login limit ------------------------------------------------------------------------------

def test_ten_connections_on_one_user_starting_together_log_in_once(ctms, make_client):
    ctms.admin.limits(auth_limit=3, reset_windows=True)
    try:
        ctms.admin.reset_counters()
        clients = [make_client() for _ in range(10)]   # one per connection file, one integration user
        start, errors = threading.Barrier(10), []

        def run(client):
            start.wait()
            try:
                list(client.query(STUDIES))
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert counters(ctms)["auth"] == 1   # one session shared: far under the limit
        for client in clients[:-1]:
            client.close()
        assert counters(ctms)["endpoints"].get("DELETE /api/{version}/session", 0) == 0   # still in use
        clients[-1].close()
        assert counters(ctms)["endpoints"]["DELETE /api/{version}/session"] == 1   # the last one ends it
    finally:
        ctms.admin.limits(auth_limit=120, reset_windows=True)


def test_a_client_with_another_password_does_not_borrow_the_session(ctms, make_client):
    from clinical_crm.vault.errors import VaultAuthenticationError

    good = make_client()
    list(good.query(STUDIES))
    with pytest.raises(VaultAuthenticationError):
        make_client(password="wrong", max_retries=0).authenticate()


def test_re_logins_are_spaced(ctms, make_client, sleeps):
    client = make_client(login_spacing_seconds=30)
    list(client.query(STUDIES))
    ctms.admin.expire_sessions()
    list(client.query(STUDIES))   # a re-login right after the first
    assert client.counters["login_spaced"] == 1 and client.counters["reauth"] == 1
    assert len(sleeps) == 1 and 25 < sleeps[0] <= 30


def test_past_the_login_limit_the_login_waits_for_the_next_window(ctms):
    ctms.admin.limits(auth_limit=1, auth_window_seconds=1, reset_windows=True)
    client = VaultClient(ctms.url, INTEGRATION_USER, PASSWORD, login_window_seconds=1, share_session=False)
    try:
        time.sleep(1.02 - time.time() % 1)   # the start of a window, so the next login lands in it
        other = requests.post(f"{ctms.url}/api/v25.2/auth", data={"username": INTEGRATION_USER, "password": PASSWORD},
                              timeout=10).json()
        assert other["responseStatus"] == "SUCCESS"   # another process spent the window's only login
        list(client.query(STUDIES))
        assert client.counters["login_limited"] == 1 and client.counters["auth"] == 2
    finally:
        client.close()
        ctms.admin.limits(auth_limit=120, auth_window_seconds=60, reset_windows=True)


# -- maintenance windows --------------------------------------------------------------------------

class EndsDowntime(list):
    """A fake sleep: records each pause; the first one ends the sandbox's maintenance window, as
    waiting that long would."""

    def __init__(self, server):
        super().__init__()
        self.server = server

    def __call__(self, seconds: float) -> None:
        if not self:
            self.server.admin.downtime(minutes=0)
        self.append(seconds)


def test_a_maintenance_window_is_waited_out_once(ctms, make_client, caplog):
    sleep = EndsDowntime(ctms)
    client = make_client(sleep=sleep)
    list(client.query(STUDIES))
    ctms.admin.downtime(minutes=5)
    try:
        with caplog.at_level("WARNING", logger="clinical_crm.vault.client"):
            assert list(client.query(STUDIES))
    finally:
        ctms.admin.downtime(minutes=0)
    assert client.counters["maintenance_waits"] == 1 and client.counters["retry"] == 1
    assert len(sleep) == 1 and 290 < sleep[0] <= 300   # the stated duration, not a backoff
    assert "down for maintenance" in caplog.text


def test_the_maintenance_wait_is_capped_and_happens_once_per_call(ctms, make_client, sleeps):
    client = make_client(maintenance_max_wait=10, max_retries=2)
    list(client.query(STUDIES))
    ctms.admin.downtime(minutes=30)
    try:
        with pytest.raises(VaultMaintenanceError):
            list(client.query(STUDIES))   # the fake sleep never ends the window
    finally:
        ctms.admin.downtime(minutes=0)
    assert client.counters["maintenance_waits"] == 1
    assert sleeps[0] == 10 and len(sleeps) == 2   # then the ordinary backoff, within the retries
    assert sleeps[1] <= client.backoff_max


def test_a_maintenance_window_at_login_is_waited_out_too(ctms, make_client):
    sleep = EndsDowntime(ctms)
    client = make_client(sleep=sleep, share_session=False)
    ctms.admin.downtime(minutes=1)
    try:
        client.authenticate()
    finally:
        ctms.admin.downtime(minutes=0)
    assert client.counters["maintenance_waits"] == 1 and 50 < sleep[0] <= 60


# -- deletions --------------------------------------------------------------------------------------

def test_deletions_are_read_5000_a_page(ctms, make_client):
    client = make_client(burst_floor=0)
    run = uuid.uuid4().hex[:8]
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    records = [{"object_type__vr.api_name__v": "medical_activity__v", "external_id__v": f"DEL-{run}-{n:05d}",
                "subject__v": "to delete", "channel__v": "phone__v", "activity_date__v": "2026-01-05"}
               for n in range(1200)]
    ids = [o.id for o in client.upsert("crm_activity__v", records, id_param="external_id__v")]
    session = {"Authorization": client._session_id}
    for start in range(0, len(ids), 500):
        body = requests.delete(f"{ctms.url}/api/v25.2/vobjects/crm_activity__v", headers=session,
                               json=[{"id": i} for i in ids[start:start + 500]], timeout=60).json()
        assert body["responseStatus"] == "SUCCESS"
    ctms.admin.reset_counters()
    pages = list(client.deletions("crm_activity__v", since, datetime.now(timezone.utc) + timedelta(seconds=5)))
    assert {r["id"] for p in pages for r in p.records} >= set(ids)
    assert counters(ctms)["endpoints"][DELETIONS] == 1   # 1,200 ids in one page (the default limit: two)
