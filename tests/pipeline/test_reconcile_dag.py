"""The reconcile__<connection> DAG and its configuration key (no vaults: see
tests/e2e/test_reconcile.py for reconciliation itself)."""
from __future__ import annotations

import pytest
import yaml

from clinical_crm.airflow import dag_factory
from clinical_crm.config import parse_connection
from clinical_crm.errors import ConfigError

from support import REPO


def demo(**reconcile) -> dict:
    data = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
    if reconcile:
        data["reconcile"] = reconcile
    return data


def test_daily_by_default_one_task_per_flow_in_the_target_pool(demo_cfg):
    from airflow.sdk import CronTriggerTimetable

    dag = dag_factory.build_dags([demo_cfg])["reconcile__demo"]
    assert isinstance(dag.timetable, CronTriggerTimetable) and dag.timetable.expression == "0 0 * * *"
    assert {t.task_id: t.pool for t in dag.tasks} == {"reconcile_ctms_to_crm": "vault_crm_demo",
                                                       "reconcile_crm_to_ctms": "vault_ctms_demo"}
    assert set(dag.params) == {"repair"} and dag.params["repair"] is None
    assert dag.max_active_runs == 1 and dag.catchup is False and "reconcile" in dag.tags


def test_cron_and_repair_from_the_connection_file():
    cfg = parse_connection(demo(cron="30 4 * * 1", repair=True))
    assert cfg.reconcile.repair is True
    assert dag_factory.build_reconcile_dag(cfg).timetable.expression == "30 4 * * 1"
    assert parse_connection(demo()).reconcile.repair is False


@pytest.mark.parametrize("reconcile, problem", [({"cron": "every day"}, "reconcile.cron"),
                                                ({"repaired": True}, "reconcile.repaired: unknown key")])
def test_bad_reconcile_key_is_named(reconcile, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_connection(demo(**reconcile))


@pytest.mark.parametrize("param, in_file, repairs", [(None, False, False), (None, True, True), (True, False, True),
                                                     (False, True, False)])
def test_the_param_repair_overrides_the_file(tmp_path, monkeypatch, param, in_file, repairs):
    import contextlib

    from clinical_crm.engine import reconcile

    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo(repair=in_file)))
    calls = []
    monkeypatch.setattr(dag_factory, "_clients", lambda *a: contextlib.nullcontext({}))
    monkeypatch.setattr(reconcile, "reconcile", lambda flow, cfg, clients, run_id, repair: calls.append(repair) or {})
    dag_factory.reconcile.function(str(path), "ctms_to_crm", params={"repair": param}, run_id="manual__1")
    assert calls == [repairs]


def test_an_inactive_connection_reconciles_nothing(tmp_path, monkeypatch):
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo()).replace("active: true", "active: false", 1))
    monkeypatch.setattr(dag_factory, "_clients", lambda *a: pytest.fail("no client for an inactive connection"))
    assert dag_factory.reconcile.function(str(path), "ctms_to_crm", params={}, run_id="manual__1") == {}
