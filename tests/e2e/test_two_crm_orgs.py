"""Two CRM orgs, one CTMS: one connection per org, each CRM vault with its own vault id, so the
global ids of their calls differ and both orgs' calls become Medical Activities side by side
(before `--vault-id`, both sandboxes were vault 2002 and the second org's call overwrote the
first org's Medical Activity). Activities go to both orgs."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from clinical_crm.vault import VaultClient
from support import REPO, vault_conn

USER, PASSWORD = "integration@sandbox.example", "sandbox"
ORGS = {"org_a": ("vault_crm_a", 2002), "org_b": ("vault_crm_b", 2003)}


def external_ids(client, statement: str) -> list[str]:
    return [r["external_id__v"] for page in client.query(statement) for r in page.records]


@pytest.mark.slow
def test_two_crm_orgs_exchange_calls_and_activities_without_collision(tmp_path, airflow_db, monkeypatch):
    from vault_sandbox.testing import SandboxServer

    connections = tmp_path / "connections"
    connections.mkdir()
    demo = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
    for name, (conn_id, _) in ORGS.items():
        data = copy.deepcopy(demo) | {"name": name, "crm_conn_id": conn_id}
        (connections / f"{name}.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("CLINICAL_CRM_CONNECTIONS_DIR", str(connections))
    monkeypatch.setenv("CLINICAL_CRM_DATA_DIR", str(tmp_path / "data"))
    with SandboxServer("ctms", tmp_path / "ctms.db", seed="demo") as ctms, \
            SandboxServer("crm", tmp_path / "a.db", seed="demo", vault_id=2002) as crm_a, \
            SandboxServer("crm", tmp_path / "b.db", seed="demo", vault_id=2003) as crm_b:
        monkeypatch.setenv("AIRFLOW_CONN_VAULT_CTMS_DEMO", vault_conn(ctms.url))
        for server, (conn_id, _) in zip((crm_a, crm_b), ORGS.values()):
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", vault_conn(server.url))
        from clinical_crm.airflow.dag_factory import build_dags

        dags = build_dags()
        now = datetime.now(timezone.utc)
        # the window reaches past the runs: org_a's run writes the automated Clinical Activities
        # (and reads them by id); org_b's run then reads them as changed in its window
        conf = {"window_start": (now - timedelta(days=30)).isoformat(),
                "window_end": (now + timedelta(minutes=10)).isoformat()}
        for flow in ("crm_to_ctms", "ctms_to_crm"):
            for org in ORGS:
                assert dags[f"{flow}__{org}"].test(run_conf=conf, logical_date=now).state == "success", (flow, org)

        with VaultClient(ctms.url, USER, PASSWORD) as client:
            medical = external_ids(client, "SELECT external_id__v FROM crm_activity__v "
                                           "WHERE object_type__vr.api_name__v = 'medical_activity__v'")
        by_org = {vault_id: [m for m in medical if m.startswith(f"{vault_id}_")] for _, vault_id in ORGS.values()}
        assert by_org[2002] and len(by_org[2002]) == len(by_org[2003])  # the same seed: as many calls each
        assert len(medical) == len(set(medical)) == len(by_org[2002]) + len(by_org[2003])  # none overwritten
        assert {m.split("_", 1)[1] for m in by_org[2002]} == {m.split("_", 1)[1] for m in by_org[2003]}

        sent = []
        for server in (crm_a, crm_b):
            with VaultClient(server.url, USER, PASSWORD) as client:
                sent.append(sorted(external_ids(client, "SELECT external_id__v FROM clinical_interaction__v")))
        assert sent[0] and sent[0] == sent[1]  # every Clinical Activity went to both orgs
        assert all(e.startswith("1001_") for e in sent[0])  # never an echo of a Medical Activity
