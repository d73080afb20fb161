"""Object types an admin has not activated (`--inactive-object-types`): the configuration API for
object types, `active` in object metadata, and writes of an inactive type refused per record."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vault_http import API, NOW, Client
from vault_sandbox.testing import SandboxServer

ACT = "crm_activity__v"
MEDICAL = "crm_activity__v.medical_activity__v"


def medical(key: str, **fields) -> dict:
    return {"external_id__v": key, "object_type__vr.api_name__v": "medical_activity__v", "subject__v": "From CRM",
            **fields}


def clinical(person: str, key: str) -> dict:
    return {"external_id__v": key, "object_type__vr.api_name__v": "clinical_activity__v", "person__v": person}


def config(client: Client, component: str) -> dict:
    return client.request("GET", f"/api/{API}/configuration/{component}").json()


@pytest.fixture(scope="module")
def inactive(tmp_path_factory):
    """A CTMS vault that already holds one Medical Activity, served with Medical Activity inactive."""
    db = tmp_path_factory.mktemp("inactive") / "ctms.db"
    with SandboxServer("ctms", db, seed="demo", now=NOW) as server:
        made = Client(server.url).write("POST", ACT, [medical("MED-OLD")], id_param="external_id__v")
        assert made["data"][0]["responseStatus"] == "SUCCESS", made
    with SandboxServer("ctms", db, seed="demo", inactive_object_types=[MEDICAL]) as server:
        yield server


@pytest.fixture
def client(inactive) -> Client:
    return Client(inactive.url)


@pytest.fixture(scope="module")
def person(inactive) -> str:
    return Client(inactive.url).query("SELECT id FROM person__sys ORDER BY id PAGESIZE 1")["data"][0]["id"]


def test_configuration_lists_every_object_type_with_its_state(client):
    body = config(client, "Objecttype")
    assert body["responseStatus"] == "SUCCESS"
    by_name = {e["name"]: e for e in body["data"]}
    assert by_name[MEDICAL] == {"name": MEDICAL, "object": ACT, "type": "medical_activity__v",
                                "label": "Medical Activity", "active": False}
    assert by_name["crm_activity__v.clinical_activity__v"]["active"] is True
    assert by_name["person__sys.base__v"] == {"name": "person__sys.base__v", "object": "person__sys",
                                              "type": "base__v", "label": "Person", "active": True}


def test_configuration_of_one_object_type(client):
    one = config(client, f"Objecttype.{MEDICAL}")
    assert one["responseStatus"] == "SUCCESS"
    assert one["data"] == {"name": MEDICAL, "object": ACT, "type": "medical_activity__v",
                           "label": "Medical Activity", "active": False}
    unknown = config(client, "Objecttype.crm_activity__v.nope__v")
    assert unknown["responseStatus"] == "FAILURE" and unknown["errors"][0]["type"] == "INVALID_DATA"
    other = config(client, "Picklist.channel__v")
    assert other["responseStatus"] == "FAILURE" and other["errors"][0]["type"] == "MALFORMED_URL"


def test_metadata_shows_which_object_types_are_active(client, ctms_client):
    types = {t["name"]: t["active"] for t in client.request(
        "GET", f"/api/{API}/metadata/vobjects/{ACT}").json()["object"]["object_types"]}
    assert types == {"clinical_activity__v": True, "medical_activity__v": False}
    default = {t["name"]: t["active"] for t in ctms_client.request(
        "GET", f"/api/{API}/metadata/vobjects/{ACT}").json()["object"]["object_types"]}
    assert default == {"clinical_activity__v": True, "medical_activity__v": True}
    assert all(e["active"] for e in config(ctms_client, "Objecttype")["data"])


def test_create_and_upsert_of_an_inactive_type_fail_per_record(client, person):
    upsert = client.write("POST", ACT, [clinical(person, "OT-CLIN-1"), medical("OT-MED-1")],
                          id_param="external_id__v")
    assert upsert["responseStatus"] == "SUCCESS"
    assert upsert["data"][0]["responseStatus"] == "SUCCESS"
    error = upsert["data"][1]["errors"][0]
    assert upsert["data"][1]["responseStatus"] == "FAILURE"
    assert error["type"] == "INVALID_DATA" and MEDICAL in error["message"] and "inactive" in error["message"]
    create = client.write("POST", ACT, [medical("OT-MED-2")])
    assert create["data"][0]["errors"][0]["type"] == "INVALID_DATA"
    assert client.query(f"SELECT id FROM {ACT} WHERE external_id__v CONTAINS ('OT-MED-1', 'OT-MED-2')")["data"] == []


def test_updates_into_or_of_an_inactive_type_fail(client, person):
    made = client.write("POST", ACT, [clinical(person, "OT-CLIN-2")], id_param="external_id__v")
    clinical_id = made["data"][0]["data"]["id"]
    into = client.write("PUT", ACT, [{"id": clinical_id, "object_type__vr.api_name__v": "medical_activity__v"}])
    assert into["data"][0]["errors"][0]["type"] == "INVALID_DATA"
    old = client.write("POST", ACT, [medical("MED-OLD", subject__v="Changed")], id_param="external_id__v")
    assert old["data"][0]["errors"][0]["type"] == "INVALID_DATA" and MEDICAL in old["data"][0]["errors"][0]["message"]


def test_queries_still_read_an_inactive_type(client):
    rows = client.query(f"SELECT external_id__v, subject__v FROM {ACT} "
                        "WHERE object_type__vr.api_name__v = 'medical_activity__v'")["data"]
    assert rows == [{"external_id__v": "MED-OLD", "subject__v": "From CRM"}]


def test_unknown_object_type_fails_at_start(tmp_path):
    refused = subprocess.run([sys.executable, "-m", "vault_sandbox", "serve", "--app", "ctms", "--db",
                              str(tmp_path / "ctms.db"), "--port", "1", "--inactive-object-types",
                              "crm_activity__v.nope__v"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "crm_activity__v.nope__v" in refused.stderr and MEDICAL in refused.stderr
