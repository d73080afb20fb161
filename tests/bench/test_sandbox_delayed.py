"""The sandbox counts the calls it delays past the burst limit (bench/floor.py reports them)."""
from __future__ import annotations

import requests

from vault_sandbox.testing import API, SandboxServer


def test_calls_past_the_burst_limit_are_counted_as_delayed(tmp_path):
    # a window of ~4 months (clock-aligned): the four calls never straddle two windows
    with SandboxServer("ctms", tmp_path / "ctms.db", seed="users", burst_limit=2,
                       burst_window_seconds=10_000_000, burst_delay_ms=1) as ctms:
        http = requests.Session()
        http.headers["Authorization"] = http.post(f"{ctms.url}/api/{API}/auth", data={
            "username": ctms.admin.username, "password": ctms.admin.password}).json()["sessionId"]
        delays = [http.post(f"{ctms.url}/api/{API}/query", data={"q": "SELECT id FROM user__sys"})
                  .headers.get("X-VaultAPI-ResponseDelay") for _ in range(4)]
        assert delays == [None, None, "1", "1"]
        counters = ctms.admin.counters()
        assert counters["delayed"] == 2 and counters["endpoints"]["POST /api/{version}/query"] == 4
        ctms.admin.reset_counters()
        assert ctms.admin.counters()["delayed"] == 0
