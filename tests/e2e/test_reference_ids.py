"""A run's reference prefix, end to end: the ledger stores it, the page shows it on the run's row,
and the sandbox saw it at the start of the X-VaultAPI-ReferenceID of every call of that run."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.engine.ledger import Ledger

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_every_call_of_a_run_carries_the_run_s_reference_prefix(vaults):
    from fastapi.testclient import TestClient

    from clinical_crm.airflow import plugin
    from clinical_crm.airflow.dag_factory import build_dags

    for server in vaults:
        server.admin.reset_counters()
    now = datetime.now(timezone.utc)
    dag_run = build_dags()["ctms_to_crm__demo"].test(
        run_conf={"window_start": (now - timedelta(days=30)).isoformat(), "window_end": now.isoformat()},
        logical_date=now)
    assert dag_run.state == "success"
    run = next(r for r in Ledger().recent_runs("demo", limit=10) if r["dag_run_id"] == dag_run.run_id)
    prefix = run["reference_prefix"]
    assert prefix and prefix.startswith("demo:ctms_to_crm__demo:manual__")

    tasks = set()
    for server in vaults:
        references = server.admin.counters()["references"]
        assert references and "" not in references        # no call without a reference id
        assert all(ref.startswith(prefix + ":") for ref in references), references
        tasks |= {ref[len(prefix) + 1:].rsplit(":", 1)[0] for ref in references}
    assert {"extract", "load"} <= tasks   # task id and try number follow the prefix

    page = TestClient(plugin.create_app(require_airflow_login=False)).get("/")
    assert page.status_code == 200
    row = page.text.split(f'data-dag-run-id="{dag_run.run_id}"', 1)[1].split("</tr>", 1)[0]
    assert f"<code>{prefix}</code>" in row
