"""Fixtures for the client tests: real sandbox vaults over HTTP on 127.0.0.1 (no mocked HTTP)."""
from __future__ import annotations

import pytest

from clinical_crm.vault.client import VaultClient

INTEGRATION_USER = "integration@sandbox.example"
PASSWORD = "sandbox"


class Sleeps(list):
    """Stands in for time.sleep: records the pauses instead of waiting (no wall-clock in tests)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture(scope="module")
def ctms(tmp_path_factory):
    from vault_sandbox.testing import SandboxServer

    with SandboxServer("ctms", tmp_path_factory.mktemp("ctms") / "ctms.db", seed="demo", slow_seconds=2) as server:
        yield server


@pytest.fixture(scope="module")
def crm(tmp_path_factory):
    from vault_sandbox.testing import SandboxServer

    with SandboxServer("crm", tmp_path_factory.mktemp("crm") / "crm.db", seed="demo") as server:
        yield server


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(ctms, sleeps):
    """make_client(**options) -> a VaultClient on the CTMS sandbox that records its sleeps."""
    clients = []

    def make(server=None, username=INTEGRATION_USER, password=PASSWORD, **options):
        options.setdefault("sleep", sleeps)
        client = VaultClient((server or ctms).url, username, password, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    # leave the shared sandbox as we found it
    ctms.admin.faults(rate=0, queue=[])
    ctms.admin.limits(burst_limit=2000, burst_delay_ms=500, burst_window_seconds=300, page_size=1000,
                      reset_windows=True)
    ctms.admin.reset_counters()
