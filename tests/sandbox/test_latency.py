"""The latency model (`--latency`): per-kind delays that hold neither the database nor the event
loop, a per-record write cost, the built-in `vault` profile, run-time changes and bad profiles.

Timings are checked with lower bounds on each call and generous upper bounds (the machine may be
loaded): concurrent calls must overlap, not queue."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from vault_http import API, Client
from vault_sandbox.control import VAULT_LATENCY, Latency, LatencyProfile, call_kind
from vault_sandbox.testing import SandboxServer

QUERY_MS, WRITE_MS, PER_RECORD_MS = 400, 200, 4
PAGE_MS, DELETIONS_MS, METADATA_MS = 250, 150, 300
Q = "SELECT id FROM user__sys"


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    base = tmp_path_factory.mktemp("latency")
    profile = base / "latency.yaml"
    profile.write_text(f"query_ms: {QUERY_MS}\nwrite_ms: {WRITE_MS}\nwrite_per_record_ms: {PER_RECORD_MS}\n"
                       f"query_page_ms: {PAGE_MS}\ndeletions_ms: {DELETIONS_MS}\nmetadata_ms: {METADATA_MS}\n"
                       "jitter: 0\n")
    with SandboxServer("ctms", base / "ctms.db", seed="users", latency=profile) as server:
        yield server


def test_concurrent_queries_wait_side_by_side(slow):
    clients = [Client(slow.url) for _ in range(6)]
    for client in clients:
        client.login()                         # auth has no delay in this profile
    durations: list[float] = []
    start = threading.Barrier(len(clients))

    def run(client: Client) -> None:
        start.wait()
        seconds, body = timed(lambda: client.query(Q))
        assert body["responseStatus"] == "SUCCESS"
        durations.append(seconds)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    assert len(durations) == 6
    assert min(durations) >= QUERY_MS / 1000 - 0.01, durations
    sequential = len(clients) * QUERY_MS / 1000
    assert wall < 0.6 * sequential, (wall, durations)
    print(f"6 concurrent queries of {QUERY_MS} ms: {wall:.2f} s in all (sequential {sequential:.1f} s), "
          f"each {min(durations):.2f}-{max(durations):.2f} s")


def test_a_write_costs_base_plus_per_record(slow):
    client = Client(slow.url)
    client.login()
    one, body = timed(lambda: client.write("POST", "person__sys", [{"last_name__sys": "One"}]))
    assert body["data"][0]["responseStatus"] == "SUCCESS"
    n = 150
    many, body = timed(lambda: client.write("POST", "person__sys", [{"last_name__sys": f"P{i}"} for i in range(n)]))
    assert len(body["data"]) == n
    expected_one = (WRITE_MS + PER_RECORD_MS) / 1000
    expected_many = (WRITE_MS + n * PER_RECORD_MS) / 1000
    assert expected_one - 0.01 <= one < expected_one + 1.5
    assert expected_many - 0.01 <= many < expected_many + 1.5
    assert many - one > 0.8 * (n - 1) * PER_RECORD_MS / 1000
    print(f"write of 1 record: {one:.2f} s (profile {expected_one:.2f}), of {n}: {many:.2f} s "
          f"(profile {expected_many:.2f})")


def test_pages_deletions_and_other_calls_have_their_delays(slow):
    client = Client(slow.url)
    client.login()
    first = client.query(f"{Q} PAGESIZE 2")
    page, body = timed(lambda: client.request("GET", first["responseDetails"]["next_page"]).json())
    assert body["responseStatus"] == "SUCCESS" and page >= PAGE_MS / 1000 - 0.01
    deletions, _ = timed(lambda: client.request("GET", f"/api/{API}/objects/deletions/vobjects/person__sys"))
    assert deletions >= DELETIONS_MS / 1000 - 0.01
    for path in [f"/api/{API}/metadata/vobjects/person__sys", f"/api/{API}/objects/users/me"]:
        assert timed(lambda path=path: client.request("GET", path))[0] >= METADATA_MS / 1000 - 0.01
    slow.admin.counters()                   # (logs the helper in)
    admin, _ = timed(slow.admin.counters)
    assert admin < 0.8 * METADATA_MS / 1000     # admin calls are not delayed


@pytest.mark.parametrize("method, path, kind", [
    ("POST", "/api/v25.2/auth", "auth"),
    ("POST", "/api/v25.2/query", "query"),
    ("GET", "/api/v25.2/query/0b7c?pagesize=1000&pageoffset=1000", "query_page"),
    ("POST", "/api/v25.2/query/0b7c", "query_page"),
    ("POST", "/api/v25.2/vobjects/crm_activity__v", "write"),
    ("PUT", "/api/v25.2/vobjects/crm_activity__v", "write"),
    ("DELETE", "/api/v25.2/vobjects/crm_activity__v/V1H0000000000001", "write"),
    ("GET", "/api/v25.2/vobjects/crm_activity__v/V1H0000000000001", "metadata"),
    ("GET", "/api/v25.2/objects/deletions/vobjects/crm_activity__v", "deletions"),
    ("GET", "/api/v25.2/metadata/vobjects/crm_activity__v", "metadata"),
    ("GET", "/api/v25.2/configuration/Objecttype", "metadata"),
])
def test_call_kinds(method, path, kind):
    assert call_kind(method, path.split("?")[0]) == kind


def test_past_the_burst_limit_both_delays_add_up(slow):
    client = Client(slow.url)
    client.login()
    slow.admin.limits(burst_limit=1, burst_delay_ms=300, reset_windows=True)
    slow.admin.reset_counters()
    try:
        first = client.request("POST", f"/api/{API}/query", data={"q": Q})
        seconds, second = timed(lambda: client.request("POST", f"/api/{API}/query", data={"q": Q}))
        assert "X-VaultAPI-ResponseDelay" not in first.headers
        assert second.headers["X-VaultAPI-ResponseDelay"] == "300"
        assert seconds >= 0.3 + QUERY_MS / 1000 - 0.01
        assert slow.admin.counters()["endpoints"] == {"POST /api/{version}/query": 2}
    finally:
        slow.admin.limits(burst_limit=2000, burst_delay_ms=500, reset_windows=True)


def test_none_adds_nothing_and_profiles_change_at_run_time(ctms, ctms_client):
    assert ctms.admin.latency() == {"responseStatus": "SUCCESS", "profile": "none", "seed": 0, "auth_ms": 0,
                                    "query_ms": 0, "query_page_ms": 0, "write_ms": 0, "write_per_record_ms": 0,
                                    "deletions_ms": 0, "metadata_ms": 0, "jitter": 0.0}
    quick = min(timed(lambda: ctms_client.query("SELECT id FROM study__v"))[0] for _ in range(5))
    assert quick < 0.15
    try:
        changed = ctms.admin.latency(query_ms=300, jitter=0)
        assert (changed["profile"], changed["query_ms"], changed["metadata_ms"]) == ("custom", 300, 0)
        assert timed(lambda: ctms_client.query("SELECT id FROM study__v"))[0] >= 0.29
        assert ctms.admin.latency(profile="vault")["auth_ms"] == 400
        assert ctms.admin.latency(profile="none", query_ms=-1)["errors"][0]["type"] == "INVALID_DATA"
    finally:
        ctms.admin.latency(profile="none", seed=0)
    assert ctms.admin.latency()["profile"] == "none"


def test_vault_profile_at_start(tmp_path):
    with SandboxServer("crm", tmp_path / "crm.db", seed="users", latency="vault", latency_seed=7) as server:
        described = server.admin.latency()
        assert {k: described[k] for k in VAULT_LATENCY} == VAULT_LATENCY
        assert (described["profile"], described["seed"]) == ("vault", 7)
        seconds, body = timed(Client(server.url).login)
        assert body["responseStatus"] == "SUCCESS" and seconds >= 0.4 * 0.75 - 0.01


def test_jitter_is_seeded_and_bounded():
    profile = LatencyProfile("vault", **VAULT_LATENCY)

    def delays(seed: int) -> list[float]:
        latency = Latency(profile, seed)
        return [latency.seconds("write", records=500) for _ in range(20)]

    assert delays(5) == delays(5) != delays(6)
    assert all(1.3 * 0.75 <= d <= 1.3 * 1.25 for d in delays(5))     # 300 ms + 500 x 2 ms, ±25 %
    assert Latency(LatencyProfile()).seconds("write", records=500) == 0


@pytest.mark.parametrize("content, fragment", [
    ('{"query_ms": 400, "qeury_page_ms": 300}', "qeury_page_ms"),       # JSON works as well as YAML
    ("query_ms: fast\n", "query_ms"),
    ("jitter: 1.5\n", "jitter"),
    ("- query_ms\n", "mapping"),
])
def test_a_bad_profile_file_stops_the_start_naming_file_and_key(tmp_path, content, fragment):
    path = tmp_path / "bad-latency.yaml"
    path.write_text(content)
    refused = subprocess.run([sys.executable, "-m", "vault_sandbox", "serve", "--app", "ctms", "--db",
                              str(tmp_path / "ctms.db"), "--port", "1", "--latency", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "--latency" in refused.stderr and str(path) in refused.stderr and fragment in refused.stderr


def test_a_missing_profile_file_is_named(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "vault_sandbox", "serve", "--app", "ctms", "--db",
                              str(tmp_path / "ctms.db"), "--latency", str(tmp_path / "nope.json")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "nope.json" in refused.stderr and "cannot read" in refused.stderr
