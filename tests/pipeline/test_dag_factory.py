"""DAG integrity: ids, timetable, retries and the fail-fast policy, pools, params, light parsing."""
from __future__ import annotations

from datetime import timedelta
import subprocess
import sys

import pytest

from clinical_crm.airflow import dag_factory
from clinical_crm.errors import ConfigError
from clinical_crm.vault.errors import VaultAuthenticationError, VaultPermissionError, VaultTransientError
from clinical_crm.errors import QualityThresholdExceeded

from support import REPO


@pytest.fixture
def dags(demo_cfg):
    return dag_factory.build_dags([demo_cfg])


def test_two_dags_per_connection(dags):
    # reconcile__demo: test_reconcile_dag.py; housekeeping__demo: test_housekeeping_dag below
    assert set(dags) == {"ctms_to_crm__demo", "crm_to_ctms__demo", "reconcile__demo", "housekeeping__demo"}
    ctms_to_crm = dags["ctms_to_crm__demo"]
    assert [t.task_id for t in ctms_to_crm.topological_sort()] == [
        "begin", "automate_activities", "extract", "validate", "transform", "load", "finish"]
    assert [t.task_id for t in dags["crm_to_ctms__demo"].topological_sort()] == [
        "begin", "extract", "validate", "transform", "load", "finish"]


def test_the_pre_step_task_is_there_only_where_the_file_enables_it(demo_cfg):
    features = demo_cfg.features.model_copy(update={"automated_activities": False})
    dags = dag_factory.build_dags([demo_cfg.model_copy(update={"features": features})])
    assert [t.task_id for t in dags["ctms_to_crm__demo"].topological_sort()] == [
        "begin", "extract", "validate", "transform", "load", "finish"]


def test_the_page_links_the_task_ids_the_factory_gives(dags, demo_cfg):
    from clinical_crm.airflow import naming
    from clinical_crm.flows import build_all

    for flow in build_all(demo_cfg):
        dag = dags[naming.dag_id(flow.name, demo_cfg.name)]
        assert [t.task_id for t in dag.topological_sort()] == naming.task_ids(flow)


def test_schedule_windows_and_run_settings(dags):
    from airflow.sdk import CronDataIntervalTimetable

    for dag in (d for d in dags.values() if not d.dag_id.startswith(("reconcile__", "housekeeping__"))):
        assert isinstance(dag.timetable, CronDataIntervalTimetable)  # a plain cron gives empty windows
        assert dag.max_active_runs == 1 and dag.catchup is False
        assert set(dag.params) == {"window_start", "window_end"}
        assert dag.doc_md and "demo" in dag.tags and dag.owner == "clinical-crm"
        assert dag.is_paused_upon_creation is False


def test_inactive_configuration_is_paused_on_creation(demo_cfg):
    dags = dag_factory.build_dags([demo_cfg.model_copy(update={"active": False})])
    assert all(d.is_paused_upon_creation for d in dags.values())


def test_retries_back_off_and_fail_fast(dags):
    from airflow.sdk import RetryAction

    for task in dags["ctms_to_crm__demo"].tasks:
        assert task.retries == 3 and task.retry_exponential_backoff and task.max_retry_delay
        assert task.execution_timeout == timedelta(hours=2)  # no task holds its pool for hours
        policy = task.retry_policy
        for error in (VaultAuthenticationError("USERNAME_OR_PASSWORD_INCORRECT"),
                      VaultPermissionError("INSUFFICIENT_ACCESS"), ConfigError("bad"),
                      QualityThresholdExceeded("too many")):
            assert policy.evaluate(error, 1, 4).action == RetryAction.FAIL
        assert policy.evaluate(VaultTransientError("EXCEPTION"), 1, 4).action == RetryAction.DEFAULT


def test_one_pool_per_vault(dags):
    pools = {t.task_id: t.pool for t in dags["ctms_to_crm__demo"].tasks}
    assert pools["extract"] == "vault_ctms_demo" and pools["load"] == "vault_crm_demo"
    assert pools["validate"] == "default_pool"
    slots = {t.task_id: t.pool_slots for t in dags["ctms_to_crm__demo"].tasks}
    # extract and load keep load.concurrency calls in flight: they hold that many slots
    assert slots["extract"] == slots["load"] == 4 and slots["begin"] == slots["validate"] == 1
    assert dag_factory.pool_name("ctms_prod") == "vault_ctms_prod"


def test_parsing_imports_no_heavy_module():
    # The first Asset a parse makes has Airflow load every provider's asset URI handlers, and the
    # Amazon provider's (the storage root on S3) imports its S3 hook: boto3 and requests. That
    # is Airflow's cost, paid by any deployment with the provider; it is paid first here, so
    # what is counted is what the DAG file itself imports (pandas, pyarrow, GX never at all).
    code = ("import runpy, sys; from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime; "
            "ProvidersManagerTaskRuntime().asset_uri_handlers; before = set(sys.modules); "
            "g = runpy.run_path('dags/clinical_crm_dags.py'); "
            "assert 'ctms_to_crm__demo' in g; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'great_expectations', 'requests') "
            "if m in sys.modules and (m not in before or m != 'requests')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_housekeeping_dag(dags, demo_cfg):
    from airflow.sdk import CronTriggerTimetable

    dag = dags["housekeeping__demo"]
    assert [t.task_id for t in dag.tasks] == ["housekeeping"]
    assert isinstance(dag.timetable, CronTriggerTimetable) and dag.catchup is False
    assert demo_cfg.retention.cron == "@daily" and "housekeeping" in dag.tags
    assert dag.tasks[0].pool == "default_pool"  # it calls no vault
