"""Alert texts (engine/alerts.py): what each says, and what none may say."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from clinical_crm.config import Alerts
from clinical_crm.engine import alerts

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)


@pytest.fixture
def cfg(demo_cfg):
    settings = {"smtp_conn_id": "smtp", "to": ["ops@example.org"], "quarantine_threshold": 2,
                "quarantine_max_age_days": 3, "max_lag_minutes": 90}
    return demo_cfg.model_copy(update={"alerts": Alerts(**settings)})


def test_failed_run_names_task_window_reason_and_link_without_emails(cfg):
    alert = alerts.run_failed(cfg, "ctms_to_crm__demo", "manual__1", "load", ("2026-06-01T10:00", "2026-06-01T11:00"),
                              "VaultInvalidDataError: record of ann.lee@example.org refused", "http://af/dags/x")
    assert alert.subject == "[clinical-crm] ctms_to_crm__demo: run failed in task load"
    assert "Window: 2026-06-01T10:00 .. 2026-06-01T11:00" in alert.body and "Task: load" in alert.body
    assert "Reason: VaultInvalidDataError: record of <email address> refused" in alert.body
    assert "@" not in alert.body


def test_thresholds(cfg):
    summary = {"dag_run_id": "r", "window_start": "a", "window_end": "b", "object": "crm_activity__v",
               "new_quarantined": 2, "reasons": {"channel_mapped": 2}, "quarantine_csv": "/r.quarantine.csv"}
    assert alerts.quarantine_new(cfg, "d", summary, "l") is None  # not above the threshold
    alert = alerts.quarantine_new(cfg, "d", {**summary, "new_quarantined": 3}, "l")
    assert "3 records newly quarantined (threshold 2)" in alert.subject and "channel_mapped: 2" in alert.body
    assert alerts.lag(cfg, "d", NOW - timedelta(minutes=90), NOW, "l") is None
    late = alerts.lag(cfg, "d", NOW - timedelta(minutes=91), NOW, "l")
    assert "no successful window for 91 minutes (limit 90)" in late.subject
    held = [{"direction": "ctms_to_crm", "object": "crm_activity__v", "source_id": f"V{i}", "reasons": ["r"],
             "first_seen": (NOW - timedelta(days=i)).isoformat()} for i in range(6)]
    old = alerts.quarantine_age(cfg, "d", "ctms_to_crm", held, NOW, "l")
    assert "2 records quarantined for more than 3 days" in old.subject and "crm_activity__v V5 (since" in old.body
    assert alerts.quarantine_age(cfg, "d", "crm_to_ctms", held, NOW, "l") is None


def test_due_once_per_day(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINICAL_CRM_REPORTS_DIR", str(tmp_path))
    assert alerts.due("demo", "k", NOW) and not alerts.due("demo", "k", NOW + timedelta(hours=23))
    assert alerts.due("demo", "k", NOW + timedelta(hours=25)) and alerts.due("demo", "other", NOW)
