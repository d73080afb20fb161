"""Names from Veeva's documentation in the models, seen over HTTP: Monitoring Event's visit method
(no channel), the Activity's labelled links, the Person's OpenData ID matching the CRM account's
veevaid__v, and the CRM identifier and call fields."""
from __future__ import annotations

from vault_http import API, Client

CHANNELS = {"in_person__v", "video__v", "phone__v", "chat_text__v", "email__v", "other__v"}


def fields(client: Client, object_name: str) -> dict[str, dict]:
    body = client.request("GET", f"/api/{API}/metadata/vobjects/{object_name}").json()
    return {f["name"]: f for f in body["object"]["fields"]}


def test_monitoring_event_has_a_visit_method_and_no_channel(ctms_client):
    event = fields(ctms_client, "monitoring_event__ctms")
    assert "channel__ctms" not in event
    method = event["monitoring_visit_method__ctms"]
    assert (method["label"], method["type"], method["picklist"]) == \
        ("Monitoring Visit Method", "Picklist", "monitoring_visit_method__ctms")
    assert {v["name"] for v in method["picklist_values"]} == CHANNELS
    assert event["activity_update_required__ctms"]["label"] == "Activity Update Required"
    assert "channel__ctms" in fields(ctms_client, "study_communication_log__ctms")
    rows, _ = ctms_client.query_all("SELECT monitoring_visit_method__ctms FROM monitoring_event__ctms")
    assert len(rows) == 12 and {r["monitoring_visit_method__ctms"][0] for r in rows} <= {"in_person__v", "video__v"}


def test_activity_links_and_person_opendata_id_are_labelled(ctms_client):
    activity = fields(ctms_client, "crm_activity__v")
    assert activity["monitoring_event__v"]["label"] == "Monitoring Event"
    assert activity["study_communication_log__v"]["label"] == "Study Communication"
    assert fields(ctms_client, "person__sys")["opendata_id__v"]["label"] == "OpenData ID"


def test_crm_identifier_and_call_fields(crm_client):
    assert {"account_identifier__v", "veevaid__v", "matchid__v", "veeva_network_id__v"} <= \
        set(fields(crm_client, "account__v"))
    call = fields(crm_client, "call2__v")
    assert call["call_channel__v"]["type"] == call["call2_status__v"]["type"] == "Picklist"


def test_person_opendata_id_matches_the_account_veevaid(ctms_client, crm_client):
    persons, _ = ctms_client.query_all("SELECT veeva_network_id__c, opendata_id__v FROM person__sys")
    accounts, _ = crm_client.query_all("SELECT veeva_network_id__v, veevaid__v FROM account__v")
    veevaid_by_network = {a["veeva_network_id__v"]: a["veevaid__v"] for a in accounts}
    matched = [p for p in persons if p["veeva_network_id__c"] in veevaid_by_network]
    assert len(matched) == 28          # all but the person without an account and the one without identifiers
    assert all(veevaid_by_network[p["veeva_network_id__c"]] == p["opendata_id__v"] for p in matched)
