"""Scenario `users`: the vault's users and security profiles, no business records; one writes one's own."""
from __future__ import annotations

import json
import subprocess
import sys

from vault_http import API, NOW, Client
from vault_sandbox.models import load_model
from vault_sandbox.testing import SandboxServer


def total(client: Client, object_name: str) -> int:
    body = client.query(f"SELECT id FROM {object_name}")
    assert body["responseStatus"] == "SUCCESS", body
    return body["responseDetails"]["total"]


def test_serve_seed_users_has_users_only_and_takes_writes(tmp_path):
    with SandboxServer("crm", tmp_path / "crm.db", seed="users", now=NOW) as server:
        client = Client(server.url)
        assert client.login()["responseStatus"] == "SUCCESS"
        assert Client(server.url, username="medical@sandbox.example").login()["responseStatus"] == "SUCCESS"
        assert total(client, "user__sys") == 5
        for object_name in load_model("crm").objects:
            if object_name != "user__sys":
                assert total(client, object_name) == 0, object_name
        fields = {f["name"]: f for f in client.request(
            "GET", f"/api/{API}/metadata/vobjects/call2__v").json()["object"]["fields"]}
        assert {v["name"] for v in fields["call_channel__v"]["picklist_values"]} >= {"phone__v", "video__v"}

        account = client.write("POST", "account__v", [{"last_name__v": "Own", "veevaid__v": "V-1"}])
        account_id = account["data"][0]["data"]["id"]
        call = client.write("POST", "call2__v", [{"account__v": account_id, "call_channel__v": "phone__v"}])
        assert call["data"][0]["responseStatus"] == "SUCCESS", call
        assert client.query("SELECT account__vr.veevaid__v FROM call2__v")["data"] == [
            {"account__vr.veevaid__v": "V-1"}]


def test_seed_command_scenario_users(tmp_path):
    db = tmp_path / "ctms.db"
    done = subprocess.run([sys.executable, "-m", "vault_sandbox", "seed", "--app", "ctms", "--db", str(db),
                           "--scenario", "users"], check=True, capture_output=True, text=True)
    assert json.loads(done.stdout)["counts"] == {"user__sys": 7}
    with SandboxServer("ctms", db, seed="none") as server:
        client = Client(server.url)
        assert total(client, "person__sys") == 0 and total(client, "crm_activity__v") == 0
        person = client.write("POST", "person__sys", [{"last_name__sys": "Own"}])["data"][0]["data"]["id"]
        made = client.write("POST", "crm_activity__v", [{"person__v": person, "external_id__v": "OWN-1",
                                                         "object_type__vr.api_name__v": "clinical_activity__v"}])
        assert made["data"][0]["responseStatus"] == "SUCCESS", made
        assert total(client, "crm_activity__v") == 1
