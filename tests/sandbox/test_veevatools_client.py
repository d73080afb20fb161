"""A client no one here wrote: Veeva's own `veevatools` logs in, pages a VQL query and upserts.

The library is used unchanged. Its login first asks login.veevavault.com for the user's auth type;
the test refuses every https:// request on the library's session so nothing leaves 127.0.0.1
(the library then falls back to password login, as it does whenever discovery fails).
"""
from __future__ import annotations

import pytest
import requests
from requests.adapters import BaseAdapter

from vault_sandbox.seed import DEMO_PASSWORD, INTEGRATION_USER
from vault_sandbox.testing import SandboxServer
from vault_http import NOW

veevavault = pytest.importorskip("veevatools.veevavault")


class RefuseOutsideTraffic(BaseAdapter):
    def send(self, request, **kwargs):
        raise requests.ConnectionError(f"test refuses traffic outside the sandbox: {request.url}")

    def close(self):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("veevatools") / "ctms.db"
    with SandboxServer("ctms", path, seed="scale", activities=2100, now=NOW) as s:
        yield s


@pytest.fixture
def vault(server):
    client = veevavault.VaultClient()
    client._session.mount("https://", RefuseOutsideTraffic())
    client.authenticate(vaultURL=server.url, vaultUserName=INTEGRATION_USER, vaultPassword=DEMO_PASSWORD)
    return client


def test_login(vault):
    assert vault.sessionId and str(vault.vaultId) == "1001"
    assert vault.LatestAPIversion == "v25.2"


def test_paged_query(vault):
    result = veevavault.QueryService(vault).bulk_query(
        "SELECT id, person__vr.veeva_network_id__c FROM crm_activity__v ORDER BY modified_date__v")
    assert result["responseStatus"] == "SUCCESS"
    assert len(result["data"]) == 2100 == len({r["id"] for r in result["data"]})


def test_upsert(vault):
    person = veevavault.QueryService(vault).query("SELECT id FROM person__sys PAGESIZE 1")["data"][0]["id"]
    csv_body = ("external_id__v,person__v,object_type__v.api_name__v,channel__v,subject__v\n"
                f"VT-1,{person},clinical_activity__v,phone__v,Sent by veevatools\n"
                f"VT-2,{person},clinical_activity__v,email__v,Sent by veevatools\n")
    objects = veevavault.ObjectService(vault)
    first = objects.create_object_records("crm_activity__v?idParam=external_id__v", csv_body)
    assert [r["responseStatus"] for r in first["data"]] == ["SUCCESS", "SUCCESS"]
    again = objects.create_object_records("crm_activity__v?idParam=external_id__v", csv_body)
    assert [r["responseStatus"] for r in again["data"]] == ["WARNING", "WARNING"]
    assert [r["data"]["id"] for r in again["data"]] == [r["data"]["id"] for r in first["data"]]
