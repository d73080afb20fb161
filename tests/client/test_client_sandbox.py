"""VaultClient against the real sandbox server over HTTP (no mocked HTTP).

Sleeps are recorded, not waited for (the client takes `sleep=`), so backoff and pacing are
asserted through the client's counters and the sandbox's request counters, never wall-clock.
"""
from __future__ import annotations

import tracemalloc
import uuid

import time

import pytest
import requests

from clinical_crm.vault import Query, vql
from clinical_crm.vault.errors import (
    VaultAuthenticationError,
    VaultInvalidDataError,
    VaultPermissionError,
    VaultQueryError,
    VaultTransientError,
)



def endpoint_calls(server, key: str) -> int:
    """How many calls the sandbox counted for one endpoint (e.g. "POST /api/{version}/query")."""
    return server.admin.counters()["endpoints"].get(key, 0)

ACTIVITY = "crm_activity__v"
WRITE = f"POST /api/{{version}}/vobjects/{ACTIVITY}"
GET_ONE = f"GET /api/{{version}}/vobjects/{ACTIVITY}/{{id}}"
QUERY = "POST /api/{version}/query"


def medical_activity(external_id: str, **values) -> dict:
    record = {
        "object_type__vr.api_name__v": "medical_activity__v",
        "external_id__v": external_id,
        "subject__v": f"Call {external_id}",
        "channel__v": "phone__v",
        "activity_date__v": "2026-01-05",
    }
    record.update(values)
    return record


def new_ids(count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"T-{run}-{n:05d}" for n in range(count)]


def any_activity_id(client) -> str:
    page = next(client.query(f"SELECT id FROM {ACTIVITY} PAGESIZE 1"))
    return page.records[0]["id"]


# -- session ---------------------------------------------------------------------------------

def test_sends_client_id_and_reuses_one_session(make_client, ctms):
    client = make_client(client_id="clinical-crm-tests")
    record_id = any_activity_id(client)
    for _ in range(3):
        client.get_record(ACTIVITY, record_id)
    assert client.counters["auth"] == 1
    assert client.vault_id == "1001"


def test_reauth_after_forced_expiry(make_client, ctms):
    client = make_client()
    record_id = any_activity_id(client)
    assert ctms.admin.expire_sessions() >= 1  # every session but the admin's own
    assert client.get_record(ACTIVITY, record_id)["id"] == record_id
    assert client.counters["reauth"] == 1 and client.counters["auth"] == 2
    assert client.counters["retry"] == 0


def test_wrong_password_is_an_authentication_error(ctms):
    from clinical_crm.vault.client import VaultClient

    client = VaultClient(ctms.url, "integration@sandbox.example", "wrong", sleep=lambda s: None)
    with pytest.raises(VaultAuthenticationError) as caught:
        _ = client.vault_id
    assert "wrong" not in str(caught.value)
    assert client.counters["retry"] == 0


def test_password_and_session_never_logged(make_client, ctms, caplog):
    caplog.set_level("DEBUG")
    client = make_client()
    record_id = any_activity_id(client)
    ctms.admin.expire_sessions()
    client.get_record(ACTIVITY, record_id)
    session_id = client._session_id
    assert session_id and session_id not in caplog.text
    assert "integration@sandbox.example" in caplog.text  # the user is logged, so logs were captured
    secret = "Pa55-word-never-logged"
    wrong = make_client(password=secret)
    with pytest.raises(VaultAuthenticationError) as caught:
        _ = wrong.vault_id
    assert secret not in caplog.text and secret not in str(caught.value) and secret not in repr(wrong)


# -- retries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["exception", "http502", "http503", "drop", "slow"])
def test_each_transient_fault_is_retried(make_client, ctms, fault):
    client = make_client(read_timeout=0.5)  # a "slow" fault (2 s) becomes a read timeout
    record_id = any_activity_id(client)
    ctms.admin.reset_counters()
    ctms.admin.faults(queue=[fault])
    assert client.get_record(ACTIVITY, record_id)["id"] == record_id
    assert client.counters["retry"] == 1
    assert endpoint_calls(ctms, GET_ONE) == 2  # the faulted call and its retry
    assert ctms.admin.counters()["faults"] == {fault: 1}


def test_injected_session_expiry_is_a_reauth_not_a_retry(make_client, ctms):
    client = make_client()
    record_id = any_activity_id(client)
    ctms.admin.faults(queue=["session_expiry"])
    assert client.get_record(ACTIVITY, record_id)["id"] == record_id
    assert client.counters["reauth"] == 1 and client.counters["retry"] == 0


def test_retries_back_off_exponentially_then_give_up(make_client, ctms, sleeps):
    client = make_client(max_retries=3, backoff_initial=1.0, backoff_max=100)
    record_id = any_activity_id(client)
    ctms.admin.faults(queue=["http503"] * 4)
    with pytest.raises(VaultTransientError):
        client.get_record(ACTIVITY, record_id)
    assert client.counters["retry"] == 3
    assert len(sleeps) == 3
    # full jitter: each wait is random in [0, 2**n]; the caps grow exponentially
    assert all(0 <= wait <= 2 ** (n + 1) for n, wait in enumerate(sleeps))


def test_whole_write_call_retried_after_transient_fault_applies_once(make_client, ctms):
    client = make_client()
    ids = new_ids(3)
    ctms.admin.reset_counters()
    ctms.admin.faults(queue=["http502"])
    outcomes = client.upsert(ACTIVITY, [medical_activity(i) for i in ids], id_param="external_id__v")
    assert [o.outcome for o in outcomes] == ["created"] * 3
    assert endpoint_calls(ctms, WRITE) == 2 and client.counters["retry"] == 1
    rows = pd_concat(client.query(f"SELECT id FROM {ACTIVITY} WHERE external_id__v CONTAINS {vql.in_list(ids)}"))
    assert len(rows) == 3  # nothing applied twice


def test_no_retry_on_invalid_data(make_client, ctms):
    client = make_client()
    any_activity_id(client)
    ctms.admin.reset_counters()
    with pytest.raises(VaultInvalidDataError):
        client.get_record(ACTIVITY, "V1I9999999999999")
    assert client.counters["retry"] == 0
    assert endpoint_calls(ctms, GET_ONE) == 1


def test_no_retry_on_insufficient_access(make_client, ctms):
    client = make_client(username="readonly@sandbox.example")
    ctms.admin.reset_counters()
    with pytest.raises(VaultPermissionError):
        client.create(ACTIVITY, [medical_activity(new_ids(1)[0])])
    assert client.counters["retry"] == 0
    assert endpoint_calls(ctms, WRITE) == 1


def test_query_errors_are_not_retried(make_client):
    client = make_client()
    with pytest.raises(VaultQueryError):
        list(client.query(f"SELECT id FROM {ACTIVITY} WHERE nonsense"))
    assert client.counters["retry"] == 0


# -- paging ----------------------------------------------------------------------------------

def pd_concat(pages):
    import pandas as pd

    from clinical_crm.engine.staging import page_frame

    return pd.concat([page_frame(p) for p in pages], ignore_index=True)


def test_pages_keep_selected_columns_and_flatten_picklists(make_client):
    client = make_client()
    columns = ["id", "channel__v", "person__vr.veeva_network_id__c"]
    pages = list(client.query(Query.select(ACTIVITY, columns).paged(7)))
    assert len(pages) > 1
    assert all(p.columns == columns for p in pages)
    channels = pd_concat(pages)["channel__v"].dropna()
    assert len(channels) and all(isinstance(v, str) for v in channels)
    empty = list(client.query(Query.select(ACTIVITY, ["id", "channel__v"]).filter(f"id = {vql.quote('none')}")))
    assert len(empty) == 1 and empty[0].columns == ["id", "channel__v"] and not empty[0].records
    assert list(pd_concat(empty).columns) == ["id", "channel__v"]  # an empty page still stages its columns


def test_paging_ten_thousand_records_in_flat_memory(tmp_path):
    """12,000 activities in 24 pages: memory held while paging does not grow with the pages read."""
    from vault_sandbox.testing import SandboxServer

    from clinical_crm.vault.client import VaultClient

    with SandboxServer("ctms", tmp_path / "scale.db", seed="scale", activities=12_000, page_size=500) as server:
        client = VaultClient(server.url, "integration@sandbox.example", "sandbox")
        statement = f"SELECT id, subject__v, channel__v, activity_date__v, external_id__v FROM {ACTIVITY}"
        tracemalloc.start()
        try:
            held, peaks, rows, pages = [], [], 0, 0
            for frame in client.query(statement):
                rows += len(frame)
                pages += 1
                del frame
                current, peak = tracemalloc.get_traced_memory()
                held.append(current)
                peaks.append(peak)
                tracemalloc.reset_peak()
        finally:
            tracemalloc.stop()
            client.close()
    assert rows == 12_000 and pages == 24
    assert client.counters["calls.query_page"] == 23
    # Kept frames would add ~100 kB a page (2 MB over these pages); streaming adds next to nothing.
    early, late = max(held[1:4]), max(held[-4:])
    assert late - early < 200_000, f"memory held grew from {early} to {late} bytes over {pages} pages"
    assert max(peaks[-4:]) < 1.5 * max(peaks[1:4]), f"peak per page grew: {peaks}"


def test_deletions_iterator(make_client, ctms):
    from datetime import datetime, timedelta, timezone

    client = make_client()
    ids = new_ids(3)
    outcomes = client.create(ACTIVITY, [medical_activity(i) for i in ids])
    created = [o.id for o in outcomes]
    start = datetime.now(timezone.utc) - timedelta(minutes=1)
    session = requests.post(f"{ctms.url}/api/v25.2/auth",
                            data={"username": "integration@sandbox.example", "password": "sandbox"}).json()["sessionId"]
    body = requests.delete(f"{ctms.url}/api/v25.2/vobjects/{ACTIVITY}", json=[{"id": i} for i in created[:2]],
                           headers={"Authorization": session}).json()
    assert body["responseStatus"] == "SUCCESS"
    frames = list(client.deletions(ACTIVITY, start, datetime.now(timezone.utc) + timedelta(minutes=1)))
    deleted = pd_concat(frames)
    assert set(created[:2]) <= set(deleted["id"]) and created[2] not in set(deleted["id"])
    assert list(deleted.columns[:2]) == ["id", "date_deleted"]


# -- writes ----------------------------------------------------------------------------------

def test_batches_split_at_500(make_client, ctms):
    client = make_client()
    ids = new_ids(1_201)
    ctms.admin.reset_counters()
    outcomes = client.upsert(ACTIVITY, [medical_activity(i) for i in ids], id_param="external_id__v")
    assert endpoint_calls(ctms, WRITE) == 3  # 500 + 500 + 201
    assert len(outcomes) == 1_201 and [o.index for o in outcomes] == list(range(1_201))
    assert {o.outcome for o in outcomes} == {"created"}
    ctms.admin.reset_counters()
    again = client.upsert(ACTIVITY, [medical_activity(i) for i in ids[:250]], id_param="external_id__v", batch_size=100)
    assert endpoint_calls(ctms, WRITE) == 3  # 100 + 100 + 50
    assert {o.outcome for o in again} == {"unchanged"}
    with pytest.raises(ValueError):
        client.upsert(ACTIVITY, [medical_activity(ids[0])], id_param="external_id__v", batch_size=501)


def test_per_record_outcomes_in_input_order(make_client):
    client = make_client()
    existing, changed, fresh, bad, fresh2 = new_ids(5)
    first = client.upsert(ACTIVITY, [medical_activity(existing), medical_activity(changed)], id_param="external_id__v")
    assert [o.outcome for o in first] == ["created", "created"]
    outcomes = client.upsert(
        ACTIVITY,
        [
            medical_activity(existing),                          # same values
            medical_activity(changed, subject__v="New subject"),  # a real change
            medical_activity(fresh),
            medical_activity(bad, channel__v="carrier_pigeon__v"),
            medical_activity(fresh2),
        ],
        id_param="external_id__v",
    )
    assert [(o.index, o.outcome) for o in outcomes] == [
        (0, "unchanged"), (1, "updated"), (2, "created"), (3, "failed"), (4, "created")]
    assert outcomes[0].id == first[0].id and outcomes[1].id == first[1].id
    assert outcomes[3].error_type == "INVALID_DATA" and "carrier_pigeon__v" in outcomes[3].message
    assert outcomes[3].id is None and all(o.error_type is None for i, o in enumerate(outcomes) if i != 3)

    updated = client.update(ACTIVITY, [{"id": first[0].id, "subject__v": "Changed"},
                                       {"id": "V1I9999999999999", "subject__v": "x"}])
    assert [o.outcome for o in updated] == ["updated", "failed"]
    assert client.get_record(ACTIVITY, first[0].id)["subject__v"] == "Changed"


def test_duplicate_id_param_in_one_batch_fails_each_record(make_client):
    client = make_client()
    twin = new_ids(1)[0]
    outcomes = client.upsert(ACTIVITY, [medical_activity(twin), medical_activity(twin)], id_param="external_id__v")
    assert [o.outcome for o in outcomes] == ["failed", "failed"]
    assert outcomes[0].error_type == "INVALID_DATA"


def test_race_condition_records_are_sent_again(make_client, ctms):
    client = make_client()
    ids = new_ids(4)
    ctms.admin.reset_counters()
    ctms.admin.faults(queue=["race_condition"])
    outcomes = client.upsert(ACTIVITY, [medical_activity(i) for i in ids], id_param="external_id__v")
    assert [o.outcome for o in outcomes] == ["created"] * 4
    assert client.counters["race_retry"] == 1
    assert endpoint_calls(ctms, WRITE) == 2  # the batch, then the one raced record alone


def test_race_condition_reported_after_retries(make_client, ctms):
    client = make_client(race_retries=2)
    ctms.admin.faults(rate=1.0, kinds=["race_condition"])
    outcomes = client.upsert(ACTIVITY, [medical_activity(new_ids(1)[0])], id_param="external_id__v")
    assert outcomes[0].outcome == "failed" and outcomes[0].error_type == "RACE_CONDITION"
    assert client.counters["race_retry"] == 2


# -- burst limit -----------------------------------------------------------------------------

def test_paces_when_burst_limit_runs_low(make_client, ctms, sleeps):
    # a day-long window, so the clock-aligned window cannot roll over during the test
    ctms.admin.limits(burst_limit=30, burst_delay_ms=5, burst_window_seconds=86_400, reset_windows=True)
    client = make_client(burst_floor=10, burst_window_seconds=86_400)
    record_id = any_activity_id(client)  # the vault's answer: 29 calls left
    for _ in range(19):  # 28 .. 10 left: down to the reserve, no waits
        client.get_record(ACTIVITY, record_id)
    assert client.counters["paced"] == 0 and client.burst_remaining == 10
    client.get_record(ACTIVITY, record_id)  # the reserve is reached: wait for the next window
    assert client.counters["paced"] == 1
    [wait] = list(sleeps)
    assert 0 < wait <= 86_400 + 1
    assert client.counters["delayed_responses"] == 0 and client.counters["retry"] == 0
    unpaced = make_client(burst_floor=0)  # no reserve: Vault delays the calls past the limit; not a fault
    for _ in range(16):  # 9 .. -7 left
        unpaced.get_record(ACTIVITY, record_id)
    assert unpaced.counters["delayed_responses"] >= 5 and unpaced.counters["retry"] == 0


def test_concurrent_calls_share_one_session_and_stay_under_the_burst_limit(make_client, ctms):
    """Eight threads on one client: one login, every call answered, none past the burst limit
    (the calls wait for the next window instead: here two-second windows)."""
    from concurrent.futures import ThreadPoolExecutor

    ctms.admin.limits(burst_limit=20, burst_delay_ms=200, burst_window_seconds=2, reset_windows=True)
    client = make_client(burst_floor=4, burst_window_seconds=2, sleep=time.sleep)
    record_id = any_activity_id(client)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.get_record(ACTIVITY, record_id)["id"], range(48)))
    assert answers == [record_id] * 48
    assert client.counters["auth"] == 1 and client.counters["calls.get"] == 48
    assert client.counters["delayed_responses"] == 0 and client.counters["paced"] >= 1


# -- VQL injection ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "evil",
    [
        "x' OR subject__v != 'x",
        "x\\' OR subject__v != \\'x",
        "x\\",
        "') OR (id != '",
        "x' ORDER BY id DESC --",
    ],
)
def test_injection_attempts_come_back_as_data(make_client, evil):
    client = make_client()
    marker = new_ids(1)[0]
    [outcome] = client.create(ACTIVITY, [medical_activity(marker, subject__v=evil + marker)])
    assert outcome.outcome == "created"
    found = pd_concat(client.query(
        f"SELECT id, subject__v FROM {ACTIVITY} WHERE subject__v = {vql.quote(evil + marker)}"))
    assert list(found["id"]) == [outcome.id] and found.loc[0, "subject__v"] == evil + marker
    nothing = pd_concat(client.query(f"SELECT id FROM {ACTIVITY} WHERE subject__v = {vql.quote(evil)}"))
    assert nothing.empty  # the value did not widen the query
    listed = pd_concat(client.query(
        f"SELECT id FROM {ACTIVITY} WHERE subject__v CONTAINS {vql.in_list([evil, evil + marker])}"))
    assert list(listed["id"]) == [outcome.id]


def test_long_contains_lists_are_split_under_the_vql_limit(make_client):
    client = make_client()
    known = list(pd_concat(client.query(f"SELECT id FROM {ACTIVITY} PAGESIZE 20"))["id"])[:20]
    values = [f"V1I{n:013d}9" for n in range(4_000)] + known  # ~80,000 characters of literals
    prefix = f"SELECT id FROM {ACTIVITY} WHERE id CONTAINS "
    with pytest.raises(VaultQueryError, match="QUERY_TOO_LONG"):
        list(client.query(prefix + vql.in_list(values)))
    assert client.counters["calls.query"] == 1  # only the lookup above was sent
    found = []
    for chunk in vql.chunk_values(values, room=vql.VQL_MAX_CHARS - len(prefix)):
        found += [r["id"] for page in client.query(prefix + vql.in_list(chunk)) for r in page.records]
    assert client.counters["calls.query"] == 3  # two chunks
    assert sorted(found) == sorted(known)


def test_a_call_and_its_retries_end_by_the_call_deadline(make_client, ctms, sleeps):
    """Bounded time: past `call_deadline` a transient fault is not retried any more (client retries
    and Airflow's task retries never stack into hours), and the time spent is counted."""
    patient = make_client()
    ctms.admin.faults(queue=["http502"])
    any_activity_id(patient)
    assert patient.counters["retry"] == 1 and patient.counters["sleep_seconds"] == sum(sleeps) > 0

    hurried = make_client(call_deadline=0)
    ctms.admin.faults(queue=["http502"])
    with pytest.raises(VaultTransientError):
        any_activity_id(hurried)
    assert hurried.counters["retry"] == 0 and hurried.counters["calls.query"] == 1
    assert hurried.counters["wait_seconds"] > 0


def test_a_partial_write_says_which_records_are_settled(make_client, ctms):
    """The re-send of a record that hit RACE_CONDITION gets no answer: with retry=False the client
    says which records the vault already answered for, so the caller re-sends only the others
    (re-sending all would find them unchanged and the ledger would lose that this run wrote them)."""
    from clinical_crm.vault.errors import VaultPartialWrite

    client = make_client()
    ids = new_ids(3)
    ctms.admin.faults(queue=["race_condition", "http502"])
    with pytest.raises(VaultPartialWrite) as caught:
        client.upsert(ACTIVITY, [medical_activity(i) for i in ids], id_param="external_id__v", retry=False)
    assert caught.value.pending == [0] and sorted(caught.value.settled) == [1, 2]
    assert [o.outcome for o in caught.value.settled.values()] == ["created", "created"]
