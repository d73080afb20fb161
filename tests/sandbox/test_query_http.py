"""VQL over HTTP: every construct, relationship fields, picklists, errors, paging and permissions."""
from __future__ import annotations

import pytest

from vault_http import API, NOW, Client
from vault_sandbox.testing import SandboxServer

ACT = "crm_activity__v"


def ids(client, where: str, obj: str = ACT) -> set[str]:
    rows, _ = client.query_all(f"SELECT id FROM {obj} WHERE {where}")
    return {r["id"] for r in rows}


@pytest.fixture(scope="module")
def activities(ctms):
    """Every demo activity with the fields the checks below need (read once)."""
    client = Client(ctms.url)
    rows, _ = client.query_all(
        "SELECT id, channel__v, complete__v, subject__v, modified_date__v, site__v, study_person__v, "
        "person__v, person__vr.veeva_network_id__c, created_by__vr.email__sys, object_type__vr.api_name__v "
        f"FROM {ACT}")
    assert len(rows) == 80
    return rows


def test_select_relationship_fields_and_picklist_arrays(activities):
    row = activities[0]
    assert isinstance(row["channel__v"], list) and len(row["channel__v"]) == 1
    assert isinstance(row["complete__v"], bool)
    assert row["object_type__vr.api_name__v"] == "clinical_activity__v"
    assert {r["created_by__vr.email__sys"] for r in activities} >= {"clinops@sandbox.example", None}
    assert any(r["person__vr.veeva_network_id__c"] for r in activities)


def test_comparison_operators(ctms_client, activities):
    by_date = sorted(r["modified_date__v"] for r in activities)
    middle = by_date[40]
    assert ids(ctms_client, f"modified_date__v < '{middle}'") == {r["id"] for r in activities
                                                                   if r["modified_date__v"] < middle}
    assert ids(ctms_client, f"modified_date__v <= '{middle}'") == {r["id"] for r in activities
                                                                    if r["modified_date__v"] <= middle}
    assert ids(ctms_client, f"modified_date__v > '{middle}'") == {r["id"] for r in activities
                                                                   if r["modified_date__v"] > middle}
    assert ids(ctms_client, f"modified_date__v >= '{middle}'") == {r["id"] for r in activities
                                                                    if r["modified_date__v"] >= middle}
    assert ids(ctms_client, "channel__v = 'phone__v'") == {r["id"] for r in activities
                                                           if r["channel__v"] == ["phone__v"]}
    assert ids(ctms_client, "channel__v != 'phone__v'") == {r["id"] for r in activities
                                                            if r["channel__v"] != ["phone__v"]}


def test_and_or_parentheses(ctms_client, activities):
    got = ids(ctms_client, "(channel__v = 'phone__v' OR channel__v = 'email__v') AND complete__v = true")
    want = {r["id"] for r in activities if r["channel__v"][0] in ("phone__v", "email__v") and r["complete__v"]}
    assert got == want
    got = ids(ctms_client, "channel__v = 'phone__v' OR channel__v = 'email__v' AND complete__v = true")
    want = {r["id"] for r in activities
            if r["channel__v"] == ["phone__v"] or (r["channel__v"] == ["email__v"] and r["complete__v"])}
    assert got == want     # AND binds tighter than OR


def test_between_and_contains(ctms_client, activities):
    dates = sorted(r["modified_date__v"] for r in activities)
    low, high = dates[10], dates[30]
    assert ids(ctms_client, f"modified_date__v BETWEEN '{low}' AND '{high}'") == \
        {r["id"] for r in activities if low <= r["modified_date__v"] <= high}
    assert ids(ctms_client, "channel__v CONTAINS ('video__v', 'chat_text__v')") == \
        {r["id"] for r in activities if r["channel__v"][0] in ("video__v", "chat_text__v")}


def test_null_comparisons(ctms_client, activities):
    assert ids(ctms_client, "site__v = null") == {r["id"] for r in activities if r["site__v"] is None}
    assert ids(ctms_client, "study_person__v != null") == {r["id"] for r in activities if r["study_person__v"]}


def test_relationship_fields_in_where(ctms_client, activities):
    assert ids(ctms_client, "created_by__vr.email__sys = 'clinops@sandbox.example'") == \
        {r["id"] for r in activities if r["created_by__vr.email__sys"] == "clinops@sandbox.example"}
    assert ids(ctms_client, "person__vr.veeva_network_id__c = null") == \
        {r["id"] for r in activities if r["person__vr.veeva_network_id__c"] is None}
    assert len(ids(ctms_client, "object_type__vr.api_name__v = 'clinical_activity__v'")) == 80


def test_quoted_string_escapes(ctms_client):
    created = ctms_client.write("POST", "study__v", [{"name__v": "Quote test", "study_title__v": "O'Brien \\ study"}])
    assert created["data"][0]["responseStatus"] == "SUCCESS"
    assert ids(ctms_client, r"study_title__v = 'O\'Brien \\ study'", obj="study__v") == \
        {created["data"][0]["data"]["id"]}


def test_order_by_several_fields(ctms_client, activities):
    rows, _ = ctms_client.query_all(f"SELECT id, channel__v, modified_date__v FROM {ACT} "
                                    "ORDER BY channel__v ASC, modified_date__v DESC")
    keys = [(r["channel__v"][0], r["modified_date__v"]) for r in rows]
    expected = sorted(keys, key=lambda k: k[1], reverse=True)
    expected = sorted(expected, key=lambda k: k[0])
    assert keys == expected


def test_pagesize_and_pageoffset(ctms_client):
    everything, _ = ctms_client.query_all(f"SELECT id FROM {ACT} ORDER BY id")
    body = ctms_client.query(f"SELECT id FROM {ACT} ORDER BY id PAGESIZE 7 PAGEOFFSET 14")
    details = body["responseDetails"]
    assert (details["pagesize"], details["pageoffset"], details["size"], details["total"]) == (7, 14, 7, 80)
    assert [r["id"] for r in body["data"]] == [r["id"] for r in everything[14:21]]
    assert details["next_page"].startswith(f"/api/{API}/query/") and "pageoffset=21" in details["next_page"]


def test_syntax_and_filter_errors(ctms_client):
    body = ctms_client.query("SELECT id FROM crm_activity__v WHERE")
    assert body["responseStatus"] == "FAILURE"
    assert body["errors"][0]["type"] == "INCORRECT_QUERY_SYNTAX_ERROR"
    assert "column" in body["errors"][0]["message"] or "end of query" in body["errors"][0]["message"]
    body = ctms_client.query("SELECT id FROM crm_activity__v WHERE colour__v = 'red'")
    assert body["errors"][0]["type"] == "INVALID_FILTER"
    assert "colour__v" in body["errors"][0]["message"]


def test_medical_activities_hidden_from_a_profile_without_read(ctms, ctms_client):
    made = ctms_client.write("POST", ACT, [{"object_type__vr.api_name__v": "medical_activity__v",
                                            "subject__v": "From CRM", "external_id__v": "2002_QUERYTEST"}],
                             id_param="external_id__v")
    assert made["data"][0]["responseStatus"] == "SUCCESS", made
    q = f"SELECT id FROM {ACT} WHERE external_id__v = '2002_QUERYTEST'"
    assert len(ctms_client.query(q)["data"]) == 1
    assert Client(ctms.url, username="readonly@sandbox.example").query(q)["data"] == []
    denied = Client(ctms.url, username="noaccess@sandbox.example").query(q)
    assert denied["responseStatus"] == "FAILURE" and denied["errors"][0]["type"] == "INSUFFICIENT_ACCESS"


def test_object_type_permissions_are_visible(ctms):
    client = Client(ctms.url, username="clinops@sandbox.example")
    body = client.request("GET", f"/api/{API}/objects/users/me/permissions",
                          params={"filter": f"name__v::object.{ACT}.object_actions"}).json()
    by_name = {e["name__v"]: e["permissions"] for e in body["data"]}
    assert by_name[f"object.{ACT}.object_type.clinical_activity__v.object_actions"] == \
        {"read": True, "edit": True, "create": True, "delete": False}
    assert by_name[f"object.{ACT}.object_type.medical_activity__v.object_actions"] == \
        {"read": True, "edit": False, "create": False, "delete": False}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "ctms.db"
    with SandboxServer("ctms", path, seed="scale", activities=2600, now=NOW) as server:
        yield server


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_paging_over_2600_records(big, method):
    client = Client(big.url)
    big.admin.reset_counters()
    rows, details = client.query_all(f"SELECT id, modified_date__v FROM {ACT} ORDER BY modified_date__v", method)
    assert len(rows) == 2600 and len({r["id"] for r in rows}) == 2600
    assert [d["size"] for d in details] == [1000, 1000, 600]
    assert all(d["total"] == 2600 for d in details)
    assert [r["modified_date__v"] for r in rows] == sorted(r["modified_date__v"] for r in rows)
    # The first page is read by OFFSET 0; the following ones continue from the last row served.
    assert big.admin.counters()["paging"] == {"offset": 1, "keyset": 2}


def test_keyset_and_offset_pages_agree(big):
    """A page fetched by jumping (OFFSET) equals the same page reached sequentially (keyset)."""
    client = Client(big.url)
    q = f"SELECT id FROM {ACT} ORDER BY modified_date__v DESC, person__v ASC PAGESIZE 500"
    sequential, _ = client.query_all(q)
    first = client.query(q)
    jump = first["responseDetails"]["next_page"].replace("pageoffset=500", "pageoffset=1500")
    page = client.request("GET", jump).json()
    assert [r["id"] for r in page["data"]] == [r["id"] for r in sequential[1500:2000]]


def test_page_size_is_capped(big):
    body = Client(big.url).query(f"SELECT id FROM {ACT} PAGESIZE 5000")
    assert body["responseDetails"]["pagesize"] == 1000 and len(body["data"]) == 1000


@pytest.mark.parametrize("order", ["site__v DESC, modified_date__v ASC", "site__v ASC, modified_date__v DESC",
                                   "study_person__v DESC", "complete__v DESC, channel__v DESC"])
def test_sequential_pages_equal_one_page_even_with_nulls_in_sort_keys(ctms, ctms_client, order):
    whole = ctms_client.query(f"SELECT id FROM {ACT} ORDER BY {order} PAGESIZE 1000")["data"]
    ctms.admin.reset_counters()
    paged, _ = ctms_client.query_all(f"SELECT id FROM {ACT} ORDER BY {order} PAGESIZE 7")
    assert [r["id"] for r in paged] == [r["id"] for r in whole]
    assert ctms.admin.counters()["paging"].get("keyset", 0) > 0


def test_order_by_an_external_id_pages_in_byte_order(crm, crm_client):
    """Reconciliation reads the target in external-id order (ORDER BY, paged) and merges it with
    the expected records sorted by Python's string order: the sandbox's order must be that one,
    across pages (keyset), with records without an external id first."""
    import random

    from clinical_crm.vault.client import VaultClient

    values = [f"1001_V{c}{i:03d}" for c in "AbZ_a0" for i in range(4)] + ["1001_", "1001_V0Ab", "1001_V0AB", "99_X"]
    random.Random(3).shuffle(values)
    with VaultClient(crm.url, "integration@sandbox.example", "sandbox") as client:
        created = client.create("clinical_study__v", [{"name__v": f"Order {i}", "external_id__v": v}
                                                      for i, v in enumerate(values)]
                                + [{"name__v": "Order without id"}])
        assert all(r.outcome == "created" for r in created)
    crm.admin.reset_counters()
    paged, _ = crm_client.query_all("SELECT id, external_id__v FROM clinical_study__v ORDER BY external_id__v PAGESIZE 7")
    got = [r["external_id__v"] for r in paged if r["external_id__v"] in set(values)]
    assert got == sorted(values)
    assert crm.admin.counters()["paging"].get("keyset", 0) > 0
