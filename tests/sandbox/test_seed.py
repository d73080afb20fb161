"""Seeds: deterministic, both vaults agree, the documented defects are there, scale stays in its hour."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

import pytest
from sqlalchemy import select

from vault_sandbox.db import Store
from vault_sandbox.models import load_model
from vault_sandbox.seed import DEMO_DEFECTS, scale_window, seed_demo, seed_scale

NOW = datetime(2026, 11, 25, 12, 30, tzinfo=timezone.utc)


def rows(store: Store, obj: str) -> list[dict]:
    table = store.table(obj)
    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(table).order_by(table.c.id)).mappings()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("seed")
    ctms, crm = Store(load_model("ctms"), str(base / "ctms.db")), Store(load_model("crm"), str(base / "crm.db"))
    seed_demo(ctms, 7, NOW)
    seed_demo(crm, 7, NOW)
    return ctms, crm, base


def test_same_seed_same_data(demo):
    ctms, _, base = demo
    again = Store(load_model("ctms"), str(base / "again.db"))
    seed_demo(again, 7, NOW)
    for obj in ["person__sys", "crm_activity__v", "study_communication_log__ctms", "user__sys"]:
        assert rows(again, obj) == rows(ctms, obj)
    other = Store(load_model("ctms"), str(base / "other.db"))
    seed_demo(other, 8, NOW)
    assert rows(other, "person__sys") != rows(ctms, "person__sys")


def test_vaults_agree_on_person_identifiers(demo):
    ctms, crm, _ = demo
    persons = rows(ctms, "person__sys")
    accounts = rows(crm, "account__v")
    by_network = Counter(a["veeva_network_id__v"] for a in accounts)
    by_npi = {a["npi__c"] for a in accounts}
    matched = [p for p in persons if by_network[p["veeva_network_id__c"]] == 1 and p["npi__c"] in by_npi]
    assert len(matched) == len(persons) - 3          # all but the three person defects
    no_account = persons[DEMO_DEFECTS["person_without_account"]]
    assert no_account["veeva_network_id__c"] and by_network[no_account["veeva_network_id__c"]] == 0
    no_identifier = persons[DEMO_DEFECTS["person_without_identifier"]]
    assert no_identifier["veeva_network_id__c"] is None and no_identifier["npi__c"] is None
    twice = persons[DEMO_DEFECTS["person_with_two_accounts"]]
    assert by_network[twice["veeva_network_id__c"]] == 2


def test_opendata_id_is_the_accounts_veevaid_with_the_same_defects(demo):
    ctms, crm, _ = demo
    persons = rows(ctms, "person__sys")
    accounts = rows(crm, "account__v")
    by_veevaid = Counter(a["veevaid__v"] for a in accounts)
    assert [by_veevaid[p["opendata_id__v"]] for p in persons[:3]] == [0, 0, 2]     # defects 1, 2, 3
    assert persons[DEMO_DEFECTS["person_without_identifier"]]["opendata_id__v"] is None
    assert all(by_veevaid[p["opendata_id__v"]] == 1 for p in persons[3:])
    # An account's OpenData id and network id are those of one and the same person.
    pairs = {(p["veeva_network_id__c"], p["opendata_id__v"]) for p in persons}
    crm_only = [a for a in accounts if (a["veeva_network_id__v"], a["veevaid__v"]) not in pairs]
    assert [a["account_identifier__v"] for a in crm_only] == ["ACC-CRM-ONLY"]                 # defect 4


def test_demo_content(demo):
    ctms, crm, _ = demo
    activities = rows(ctms, "crm_activity__v")
    assert all(a["person__v"] for a in activities)
    contexts = Counter("study_person" if a["study_person__v"] else "site" if a["site__v"]
                       else "country" if a["study_country__v"] else "study" for a in activities)
    assert set(contexts) == {"study", "site", "country", "study_person"}
    oldest = min(a["modified_date__v"] for a in activities)
    assert "2026-11-25T08:30:00.000Z" <= oldest and max(a["modified_date__v"] for a in activities) <= \
        "2026-11-25T12:30:00.000Z"
    assert any(e["activity_update_required__ctms"] for e in rows(ctms, "monitoring_event__ctms"))
    assert any(e["activity_update_required__ctms"] for e in rows(ctms, "study_communication_log__ctms"))
    users = rows(ctms, "user__sys")
    assert any(u["email__sys"] is None for u in users)                    # defect 5
    assert {u["security_profile__sys"] for u in users} == set(load_model("ctms").security_profiles)
    calls = rows(crm, "call2__v")
    assert {c["send_to_vault_clinical__v"] for c in calls} == {True, False}
    crm_only = {a["id"] for a in rows(crm, "account__v") if a["account_identifier__v"] == "ACC-CRM-ONLY"}
    assert any(c["account__v"] in crm_only and c["send_to_vault_clinical__v"] for c in calls)   # defect 4


def test_scale_scenario_stays_in_its_hour(tmp_path):
    ctms = Store(load_model("ctms"), str(tmp_path / "ctms.db"))
    crm = Store(load_model("crm"), str(tmp_path / "crm.db"))
    seed_scale(ctms, 3000, 3, NOW)
    seed_scale(crm, 3000, 3, NOW)
    start, end = scale_window(NOW)
    assert (start.hour, end.hour) == (11, 12)
    activities = rows(ctms, "crm_activity__v")
    assert len(activities) == 3000
    fmt = "%Y-%m-%dT%H:%M:%S.000Z"
    assert all(start.strftime(fmt) <= a["modified_date__v"] < end.strftime(fmt) for a in activities)
    persons = rows(ctms, "person__sys")
    assert len(persons) == 150 and len(rows(ctms, "study__v")) == 4
    accounts = rows(crm, "account__v")
    assert {p["veeva_network_id__c"] for p in persons} == {a["veeva_network_id__v"] for a in accounts}
    assert {(p["veeva_network_id__c"], p["opendata_id__v"]) for p in persons} == \
        {(a["veeva_network_id__v"], a["veevaid__v"]) for a in accounts}
    assert len({p["opendata_id__v"] for p in persons}) == 150


def test_a_database_of_an_older_model_gets_the_new_fields(tmp_path):
    from sqlalchemy import text

    path = str(tmp_path / "old.db")
    seed_demo(Store(load_model("ctms"), path), 1, NOW)
    with Store(load_model("ctms"), path).engine.begin() as conn:     # as made before opendata_id__v existed
        conn.execute(text("ALTER TABLE person__sys DROP COLUMN opendata_id__v"))
    reopened = Store(load_model("ctms"), path)
    assert len(rows(reopened, "person__sys")) == 30
    assert {p["opendata_id__v"] for p in rows(reopened, "person__sys")} == {None}
