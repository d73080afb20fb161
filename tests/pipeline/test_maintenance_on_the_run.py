"""A task that waited for a Vault maintenance window says so on its run: the ledger's counts carry
it and the page's per-object line of the run shows it."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone
from types import SimpleNamespace

from fastapi.testclient import TestClient

T0 = datetime(2026, 12, 4, 18, tzinfo=timezone.utc)


def test_maintenance_waits_are_added_to_the_run_and_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    from clinical_crm.airflow import plugin
    from clinical_crm.airflow.dag_factory import MAINTENANCE, _record_maintenance
    from clinical_crm.engine.context import RunContext
    from clinical_crm.engine.ledger import Ledger

    ledger = Ledger()
    run_id = ledger.start_run("demo", "ctms_to_crm", "manual__1", T0, T0, reference_prefix="demo:ctms_to_crm__demo:manual-1")
    ledger.set_counts(run_id, {"crm_activity__v": {"extracted": 3}})
    run = RunContext("demo", "ctms_to_crm", "manual__1", T0.isoformat(), T0.isoformat(), True, str(tmp_path), run_id).to_xcom()
    waited = SimpleNamespace(counters=Counter(maintenance_waits=1, maintenance_seconds=300))
    idle = SimpleNamespace(counters=Counter())
    _record_maintenance(run, {"ctms": waited, "crm": idle})   # extract
    _record_maintenance(run, {"crm": waited})                 # load, a second window
    _record_maintenance(run, {"crm": idle})                   # nothing waited: nothing written
    counts = ledger.run(run_id)["counts"]
    assert counts[MAINTENANCE] == {"windows": 2, "waited_seconds": 600}
    assert counts["crm_activity__v"] == {"extracted": 3}
    ledger.finish_run(run_id, "success")

    html = TestClient(plugin.create_app(require_airflow_login=False)).get("/").text
    row = html.split('data-dag-run-id="manual__1"', 1)[1].split('<tr class="run', 1)[0]
    assert "vault maintenance:" in row and "windows 2" in row and "waited_seconds 600" in row
    assert "<code>demo:ctms_to_crm__demo:manual-1</code>" in row
