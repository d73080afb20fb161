"""Writes over HTTP: create, upsert (create / update / no-op), validation, the 500 cap, duplicate
idParam values, deletions and their log, and permission checks at object-type level."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from vault_http import API, Client

ACT = "crm_activity__v"


@pytest.fixture(scope="module")
def person_id(ctms):
    return Client(ctms.url).query("SELECT id FROM person__sys ORDER BY id PAGESIZE 1")["data"][0]["id"]


def clinical(person: str, key: str, **fields) -> dict:
    return {"external_id__v": key, "person__v": person, "object_type__vr.api_name__v": "clinical_activity__v",
            "channel__v": "phone__v", "complete__v": False, "subject__v": "Enrollment check-in", **fields}


def read(client: Client, obj: str, record_id: str) -> dict:
    return client.request("GET", f"/api/{API}/vobjects/{obj}/{record_id}").json()


def test_upsert_creates_updates_and_reports_no_op(ctms_client, person_id):
    first = ctms_client.write("POST", ACT, [clinical(person_id, "UP-1")], id_param="external_id__v")
    result = first["data"][0]
    assert first["responseStatus"] == "SUCCESS" and result["responseStatus"] == "SUCCESS"
    record_id = result["data"]["id"]
    assert result["data"]["url"] == f"/api/{API}/vobjects/{ACT}/{record_id}"
    assert result["data"]["operation"] == "created"
    stored = read(ctms_client, ACT, record_id)["data"]
    assert stored["global_id__sys"] == f"1001_{record_id}" and stored["channel__v"] == ["phone__v"]
    assert stored["created_by__v"] and stored["modified_date__v"].endswith(".000Z")

    changed = ctms_client.write("POST", ACT, [clinical(person_id, "UP-1", channel__v=["video__v"])],
                                id_param="external_id__v")["data"][0]
    assert changed["responseStatus"] == "SUCCESS" and changed["data"] == {**result["data"], "operation": "updated"}
    after_change = read(ctms_client, ACT, record_id)["data"]
    assert after_change["channel__v"] == ["video__v"]

    same = ctms_client.write("POST", ACT, [clinical(person_id, "UP-1", channel__v="video__v")],
                             id_param="external_id__v")["data"][0]
    assert same["responseStatus"] == "WARNING"
    assert same["warnings"][0]["warning_type"] == "NO_DATA_CHANGES"
    assert read(ctms_client, ACT, record_id)["data"]["modified_date__v"] == after_change["modified_date__v"]


def test_results_in_input_order_with_per_record_failures(ctms_client, person_id):
    body = ctms_client.write("POST", ACT, [
        clinical(person_id, "ORD-1"),
        clinical(person_id, "ORD-2", colour__c="red"),                         # unknown field
        clinical(person_id, "ORD-3", channel__v="carrier_pigeon__v"),          # bad picklist value
        clinical(person_id, "ORD-4", person__v=None),                          # Clinical Activity without a Person
        clinical("V1B9999999999999", "ORD-5"),                                 # dangling reference
        {"external_id__v": "ORD-6", "subject__v": "x" * 1501, "person__v": person_id},   # too long
        clinical(person_id, "ORD-7"),
    ], id_param="external_id__v")
    statuses = [r["responseStatus"] for r in body["data"]]
    assert statuses == ["SUCCESS", "FAILURE", "FAILURE", "FAILURE", "FAILURE", "FAILURE", "SUCCESS"]
    messages = [r["errors"][0]["message"] for r in body["data"] if r["responseStatus"] == "FAILURE"]
    assert all(r["errors"][0]["type"] == "INVALID_DATA" for r in body["data"] if r["responseStatus"] == "FAILURE")
    assert "colour__c" in messages[0] and "carrier_pigeon__v" in messages[1]
    assert "person__v" in messages[2] and "does not exist" in messages[3]
    found = ctms_client.query(f"SELECT external_id__v FROM {ACT} WHERE external_id__v CONTAINS "
                              "('ORD-1','ORD-2','ORD-3','ORD-4','ORD-5','ORD-6','ORD-7')")["data"]
    assert sorted(r["external_id__v"] for r in found) == ["ORD-1", "ORD-7"]


def test_missing_required_field_on_create(ctms_client):
    body = ctms_client.write("POST", "study_country__v", [{"country__v": "Norway"}])
    assert body["data"][0]["errors"][0]["type"] == "INVALID_DATA"
    assert "study__v" in body["data"][0]["errors"][0]["message"]


def test_batch_of_more_than_500_is_refused_whole(ctms_client, person_id):
    body = ctms_client.write("POST", ACT, [clinical(person_id, f"CAP-{i}") for i in range(501)],
                             id_param="external_id__v")
    assert body["responseStatus"] == "FAILURE" and "500" in body["errors"][0]["message"]
    assert ctms_client.query(f"SELECT id FROM {ACT} WHERE external_id__v = 'CAP-0'")["data"] == []
    ok = ctms_client.write("POST", ACT, [clinical(person_id, f"CAP-{i}") for i in range(500)],
                           id_param="external_id__v")
    assert ok["responseStatus"] == "SUCCESS" and len(ok["data"]) == 500


def test_duplicate_idparam_values_fail_the_whole_batch(ctms_client, person_id):
    body = ctms_client.write("POST", ACT, [clinical(person_id, "DUP-1"), clinical(person_id, "DUP-2"),
                                           clinical(person_id, "DUP-1", channel__v="email__v")],
                             id_param="external_id__v")
    assert body["responseStatus"] == "FAILURE"
    assert "DUP-1" in body["errors"][0]["message"]
    assert ctms_client.query(f"SELECT id FROM {ACT} WHERE external_id__v CONTAINS ('DUP-1', 'DUP-2')")["data"] == []


def test_reference_set_through_a_unique_field_of_the_target(crm_client):
    study = crm_client.write("POST", "clinical_study__v", [{"external_id__v": "1001_V1D0000000000001",
                                                            "study_title__v": "A study"}],
                             id_param="external_id__v")["data"][0]["data"]["id"]
    site = crm_client.write("POST", "clinical_site__v", [
        {"external_id__v": "1001_V1E0000000000001", "site_name__v": "Berlin University Hospital",
         "clinical_study__vr.external_id__v": "1001_V1D0000000000001"},
        {"external_id__v": "1001_V1E0000000000002", "clinical_study__vr.external_id__v": "1001_NOPE"},
    ], id_param="external_id__v")["data"]
    assert read(crm_client, "clinical_site__v", site[0]["data"]["id"])["data"]["clinical_study__v"] == study
    assert site[1]["errors"][0]["type"] == "INVALID_DATA"


def test_update_by_id_and_csv_body(crm_client):
    account = crm_client.query("SELECT id FROM account__v ORDER BY id PAGESIZE 1")["data"][0]["id"]
    csv_body = "account__v,call_channel__v,call2_status__v,subject__v,send_to_vault_clinical__v\n" \
               f"{account},video__v,planned__v,\"Congress, follow-up\",true\n"
    created = crm_client.request("POST", f"/api/{API}/vobjects/call2__v", data=csv_body.encode(),
                                 headers={"Content-Type": "text/csv"}).json()["data"][0]
    assert created["responseStatus"] == "SUCCESS", created
    call_id = created["data"]["id"]
    updated = crm_client.write("PUT", "call2__v", [{"id": call_id, "call2_status__v": "submitted__v"}])["data"][0]
    assert updated["responseStatus"] == "SUCCESS"
    call = read(crm_client, "call2__v", call_id)["data"]
    assert call["call2_status__v"] == ["submitted__v"] and call["subject__v"] == "Congress, follow-up"
    assert call["send_to_vault_clinical__v"] is True


def test_deletions_are_logged_with_their_date(ctms_client, person_id):
    made = ctms_client.write("POST", ACT, [clinical(person_id, f"DEL-{i}") for i in range(3)],
                             id_param="external_id__v")["data"]
    doomed = [m["data"]["id"] for m in made[:2]]
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    gone = ctms_client.write("DELETE", ACT, [{"id": i} for i in doomed])
    assert [r["responseStatus"] for r in gone["data"]] == ["SUCCESS", "SUCCESS"]
    assert read(ctms_client, ACT, doomed[0])["responseStatus"] == "FAILURE"
    after = datetime.now(timezone.utc) + timedelta(seconds=2)
    fmt = "%Y-%m-%dT%H:%M:%S.000Z"
    window = ctms_client.request("GET", f"/api/{API}/objects/deletions/vobjects/{ACT}",
                                 params={"start_date": before.strftime(fmt), "end_date": after.strftime(fmt)}).json()
    assert window["responseStatus"] == "SUCCESS"
    assert {d["id"] for d in window["data"]} >= set(doomed)
    assert all(before.strftime(fmt) <= d["date_deleted"] <= after.strftime(fmt) for d in window["data"])
    earlier = ctms_client.request("GET", f"/api/{API}/objects/deletions/vobjects/{ACT}",
                                  params={"start_date": "2020-01-01T00:00:00.000Z",
                                          "end_date": "2020-01-02T00:00:00.000Z"}).json()
    assert earlier["data"] == [] and earlier["responseDetails"]["total"] == 0


def test_object_type_level_permissions(ctms, person_id):
    clinops = Client(ctms.url, username="clinops@sandbox.example")
    body = clinops.write("POST", ACT, [
        clinical(person_id, "PERM-1"),
        {"external_id__v": "PERM-2", "object_type__vr.api_name__v": "medical_activity__v", "subject__v": "x"},
    ], id_param="external_id__v")
    assert body["data"][0]["responseStatus"] == "SUCCESS"
    assert body["data"][1]["errors"][0]["type"] == "INSUFFICIENT_ACCESS"
    readonly = Client(ctms.url, username="readonly@sandbox.example")
    denied = readonly.write("POST", ACT, [clinical(person_id, "PERM-3")], id_param="external_id__v")
    assert denied["responseStatus"] == "FAILURE" and denied["errors"][0]["type"] == "INSUFFICIENT_ACCESS"


def test_metadata_describes_fields_and_object_types(ctms_client):
    body = ctms_client.request("GET", f"/api/{API}/metadata/vobjects/{ACT}").json()
    fields = {f["name"]: f for f in body["object"]["fields"]}
    assert fields["external_id__v"]["unique"] is True
    assert fields["channel__v"]["type"] == "Picklist"
    assert {v["name"] for v in fields["channel__v"]["picklist_values"]} >= {"phone__v", "chat_text__v"}
    assert fields["person__v"]["object"] == {"name": "person__sys"}
    assert fields["person__v"]["relationship_name"] == "person__vr"
    assert {t["name"] for t in body["object"]["object_types"]} == {"clinical_activity__v", "medical_activity__v"}
    assert ctms_client.request("GET", f"/api/{API}/metadata/vobjects/nope__v").json()["responseStatus"] == "FAILURE"
