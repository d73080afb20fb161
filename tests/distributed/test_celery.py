"""The distributed path, without a Docker engine: Airflow with the CeleryExecutor on this machine.

A fresh PostgreSQL database (Airflow metadata, Celery results), the sync ledger's own database and
role made by the compose postgres service's init script and reached through the Airflow connection
`clinical_crm_ledger` (as docker-compose.yaml does), and a Redis database of its own (the broker);
`scripts/airflow_init.sh` (the docker-compose init service)
migrates the database and creates the vault connections and pools; then the api-server,
dag-processor, scheduler and a Celery worker run as separate processes, two sandbox vaults serve the
demo data, and a manual run of `ctms_to_crm__demo` must succeed and leave its records in the CRM
vault. Everything started here is stopped, and the database dropped, whatever happens.
"""
from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest
import redis
import requests

from airflow_cluster import REDIS_URL, AirflowCluster, LedgerDatabase, PostgresDatabase

pytestmark = [pytest.mark.celery, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DAG_ID = "ctms_to_crm__demo"
REDIS_DB = 13  # this test's own Redis database (flushed before and after)
CTMS_VAULT_ID = "1001"


def _require_services() -> None:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        pytest.fail("Airflow 3.3 on PostgreSQL needs the async driver asyncpg (pip install asyncpg)")
    try:
        from celery.backends.database import retry  # noqa: F401
    except ImportError:
        pytest.fail("this celery release breaks apache-airflow-providers-celery 3.26 (no "
                    "celery.backends.database.retry): install celery 5.6.x")
    import psycopg2

    try:
        psycopg2.connect(dbname="postgres", host="127.0.0.1", port=5432, user="postgres", connect_timeout=5).close()
    except psycopg2.OperationalError as error:
        pytest.fail(f"PostgreSQL on 127.0.0.1:5432 (user postgres) is needed: {error}")
    try:
        redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}", socket_timeout=5).ping()
    except redis.RedisError as error:
        pytest.fail(f"Redis on 127.0.0.1:6379 is needed: {error}")


@pytest.fixture
def broker():
    _require_services()
    client = redis.Redis.from_url(f"{REDIS_URL}/{REDIS_DB}")
    client.flushdb()
    yield REDIS_DB
    client.flushdb()


def interactions_from_ctms(crm_url: str, cfg) -> list[str]:
    """External ids of the CRM's Vault Clinical Interactions that came from the CTMS vault."""
    from clinical_crm.vault.client import VaultClient

    external_id = cfg.crm.interaction.fields.external_id
    client = VaultClient(crm_url, "integration@sandbox.example", "sandbox")
    try:
        frames = list(client.query(f"SELECT id, {external_id} FROM {cfg.crm.interaction.object}"))
    finally:
        client.close()
    values = [str(r[external_id]) for page in frames for r in page.records if r.get(external_id) is not None]
    return [value for value in values if value.startswith(CTMS_VAULT_ID + "_")]


def test_connection_dag_runs_on_celery_workers(tmp_path, broker):
    from vault_sandbox.testing import SandboxServer

    from clinical_crm.config import load_connection
    from clinical_crm.engine.ledger import Ledger

    home = tmp_path / "airflow"
    home.mkdir()
    data = tmp_path / "data"
    connections = tmp_path / "connections"
    shutil.copytree(REPO / "include" / "connections", connections)
    cfg = load_connection(connections / "demo.yaml")

    with PostgresDatabase() as database, LedgerDatabase(database.name) as ledger_db, \
            SandboxServer("ctms", tmp_path / "ctms.db", seed="demo") as ctms, \
            SandboxServer("crm", tmp_path / "crm.db", seed="demo") as crm:
        assert interactions_from_ctms(crm.url, cfg) == [], "the CRM vault must start without CTMS interactions"

        cluster = AirflowCluster(home, database.url, broker, REPO / "dags", {
            "AIRFLOW_CONN_CLINICAL_CRM_LEDGER": ledger_db.conn_uri,  # workers and the api-server read it
            "CLINICAL_CRM_DATA_DIR": str(data),
            "CLINICAL_CRM_CONNECTIONS_DIR": str(connections),
            "CTMS_VAULT_URL": ctms.url,
            "CRM_VAULT_URL": crm.url,
            # only the run triggered below: no scheduled runs racing it
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        })
        cluster.env.pop("CLINICAL_CRM_LEDGER_URL", None)
        try:
            cluster.init()
            cluster.start_all()
            cluster.wait_for_dag(DAG_ID)
            run_id = cluster.trigger(DAG_ID, logical_date=None)
            state = cluster.wait_for_run(DAG_ID, run_id, timeout=300)
            tasks = cluster.task_states(DAG_ID, run_id)
            assert state == "success", f"run {run_id} ended {state}: {tasks}\n{cluster.all_logs()}"
            assert set(tasks.values()) <= {"success", "skipped"}, tasks
            assert DAG_ID in cluster.tail("celery-worker", 200_000), "the Celery worker did not run the tasks"

            # The data engineers' page of this deployment shows the run and links its Data Docs.
            assert requests.get(f"{cluster.api_url}/clinical-crm/", timeout=60).status_code == 401  # login needed
            page = cluster.get("/clinical-crm/")
            assert page.status_code == 200
            row = page.text.split(f'data-dag-run-id="{html.escape(run_id)}"')[1].split("</tr>")[0]
            assert "state-success" in row
            docs = re.search(r'class="data-docs" href="([^"]+)"', row)
            assert docs, row
            assert cluster.get(f"/clinical-crm/{html.unescape(docs.group(1))}").ok
        finally:
            cluster.stop()
            print(cluster.all_logs())  # shown by pytest when the test fails (or with -rP)

        ledger = Ledger(f"postgresql+psycopg2://{ledger_db.role}@127.0.0.1:5432/{ledger_db.name}")
        runs = [r for r in ledger.recent_runs("demo") if r["dag_run_id"] == run_id]
        assert len(runs) == 1 and runs[0]["state"] == "success", runs
        counts = runs[0]["counts"]
        print("ledger counts of the run:", json.dumps(counts))
        loaded = counts[cfg.ctms.activity.object]["loaded"]
        assert loaded > 0, json.dumps(counts)

        after = interactions_from_ctms(crm.url, cfg)
        assert len(after) == loaded, f"CRM has {len(after)} interactions, the ledger says {loaded} loaded: {counts}"
        assert len(set(after)) == len(after), "duplicate external ids in the CRM vault"
