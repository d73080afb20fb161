"""Client-level faults the 10% fault run can hit only rarely, forced with the sandbox's fault queue."""
from __future__ import annotations

import pytest

from clinical_crm.vault.client import VaultClient
from vault_sandbox.testing import SandboxServer

USER, PASSWORD = "integration@sandbox.example", "sandbox"


@pytest.fixture(scope="module")
def crm(tmp_path_factory):
    with SandboxServer("crm", tmp_path_factory.mktemp("crm") / "crm.db", seed="demo") as server:
        yield server


@pytest.mark.parametrize("queue", [
    ["session_expiry", "session_expiry"],                  # the re-authenticated call expires too
    ["session_expiry", "http503", "session_expiry"],
    ["drop", "slow", "exception", "http502", "session_expiry"],
])
def test_consecutive_faults_are_retried_not_failed(crm, queue):
    client = VaultClient(crm.url, USER, PASSWORD, backoff_initial=0.01, backoff_max=0.05, read_timeout=30)
    try:
        client.authenticate()
        crm.admin.faults(queue=list(queue), slow_seconds=0.2)
        rows = sum(len(page) for page in client.query("SELECT id FROM account__v"))
    finally:
        crm.admin.faults(queue=[], rate=0.0)
        client.close()
    assert rows > 0
    assert client.counters["retry"] >= 1 or client.counters["reauth"] >= 1


@pytest.mark.parametrize("value", ["2026-13-45", "2027-02-29", "2026-00-10"])
def test_the_sandbox_refuses_impossible_dates_like_vault(crm, value):
    """Found by the bad-input corpus: the sandbox stored dates of the right shape that do not exist."""
    client = VaultClient(crm.url, USER, PASSWORD)
    try:
        account = next(client.query("SELECT id FROM account__v")).records[0]["id"]
        out = client.create("call2__v", [{"account__v": account, "call_date__v": value}])[0]
        good = client.create("call2__v", [{"account__v": account, "call_date__v": "2028-02-29"}])[0]
    finally:
        client.close()
    assert (out.outcome, out.error_type) == ("failed", "INVALID_DATA") and value in out.message
    assert good.outcome == "created"
