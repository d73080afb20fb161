"""Fixtures: real sandbox servers on free ports (one per vault, shared by a module)."""
from __future__ import annotations

import pytest

from vault_http import NOW, Client
from vault_sandbox.testing import SandboxServer


@pytest.fixture(scope="module")
def ctms(tmp_path_factory):
    path = tmp_path_factory.mktemp("ctms") / "ctms.db"
    with SandboxServer("ctms", path, seed="demo", now=NOW) as server:
        yield server


@pytest.fixture(scope="module")
def crm(tmp_path_factory):
    path = tmp_path_factory.mktemp("crm") / "crm.db"
    with SandboxServer("crm", path, seed="demo", now=NOW) as server:
        yield server


@pytest.fixture
def ctms_client(ctms) -> Client:
    client = Client(ctms.url)
    assert client.login()["responseStatus"] == "SUCCESS"
    return client


@pytest.fixture
def crm_client(crm) -> Client:
    client = Client(crm.url)
    assert client.login()["responseStatus"] == "SUCCESS"
    return client
