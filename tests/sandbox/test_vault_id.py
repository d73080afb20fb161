"""`--vault-id`: the vault id auth and users/me report, and the prefix of every global id, also of
the seed data (`serve --seed` and the `seed` command)."""
from __future__ import annotations

import subprocess
import sys

from vault_http import API, NOW, Client
from vault_sandbox.testing import SandboxServer


def calls(client: Client) -> list[dict]:
    rows, _ = client.query_all("SELECT id, global_id__sys FROM call2__v ORDER BY id")
    return rows


def test_two_crm_vaults_with_the_same_seed_differ_by_vault_id(tmp_path):
    with SandboxServer("crm", tmp_path / "a.db", seed="demo", now=NOW) as first, \
            SandboxServer("crm", tmp_path / "b.db", seed="demo", now=NOW, vault_id=2003) as second:
        a, b = Client(first.url), Client(second.url)
        login_a, login_b = a.login(), b.login()
        assert (login_a["vaultId"], login_a["vaultIds"][0]["id"]) == (2002, 2002)
        assert (login_b["vaultId"], login_b["vaultIds"][0]["id"]) == (2003, 2003)
        me = b.request("GET", f"/api/{API}/objects/users/me").json()["users"][0]["user"]
        assert me["vault_id__v"] == 2003

        calls_a, calls_b = calls(a), calls(b)
        assert len(calls_a) == 41 and [c["id"] for c in calls_a] == [c["id"] for c in calls_b]
        assert all(c["global_id__sys"] == f"2002_{c['id']}" for c in calls_a)
        assert all(c["global_id__sys"] == f"2003_{c['id']}" for c in calls_b)

        made = b.write("POST", "clinical_study__v", [{"external_id__v": "1001_X", "study_title__v": "New"}],
                       id_param="external_id__v")["data"][0]["data"]["id"]
        record = b.request("GET", f"/api/{API}/vobjects/clinical_study__v/{made}").json()["data"]
        assert record["global_id__sys"] == f"2003_{made}"


def test_seed_command_takes_the_vault_id_and_serve_refuses_another(tmp_path):
    db = tmp_path / "crm.db"
    subprocess.run([sys.executable, "-m", "vault_sandbox", "seed", "--app", "crm", "--db", str(db),
                    "--scenario", "demo", "--now", NOW, "--vault-id", "3003"], check=True, capture_output=True)
    with SandboxServer("crm", db, seed="none", vault_id=3003) as server:
        client = Client(server.url)
        assert client.login()["vaultId"] == 3003
        assert all(c["global_id__sys"] == f"3003_{c['id']}" for c in calls(client))
    # Served under the default id, its records' global ids would lie: the server refuses to start.
    refused = subprocess.run([sys.executable, "-m", "vault_sandbox", "serve", "--app", "crm", "--db", str(db),
                              "--port", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "vault 3003" in refused.stderr and "--vault-id 3003" in refused.stderr
