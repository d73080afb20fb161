"""The distributed path, without a Docker engine: Airflow with the CeleryExecutor on this machine.

A fresh PostgreSQL database (Airflow metadata, Celery results), the sync ledger's own database and
role made by the compose postgres service's init script and reached through the Airflow connection
`clinical_crm_ledger` (as docker-compose.yaml does), and a Redis database of its own (the broker);
`scripts/airflow_init.sh` (the docker-compose init service)
migrates the database and creates the vault connections and pools; then the api-server,
dag-processor, scheduler and a Celery worker run as separate processes, two sandbox vaults serve the
demo data, and a manual run of `ctms_to_crm__demo` must succeed and leave its records in the CRM
vault; its page serves its Data Docs. Once with the storage root on the local disk, once on
object storage (moto's S3 server on a loopback port, through an Airflow `aws` connection).
Everything started here is stopped, and the database dropped, whatever happens.
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
from clinical_crm.settings import file_safe

pytestmark = [pytest.mark.celery, pytest.mark.timeout(900)]

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


def run_demo_dag(tmp_path: Path, broker: int, storage_env: dict[str, str] | None = None,
                 check=None) -> tuple[str, object, dict]:
    """Start the cluster (with `storage_env` on every process), run `ctms_to_crm__demo` once,
    check the run, its page and its Data Docs link, call `check(cluster, run_id, data)` while the
    cluster still runs; returns (run id, the connection file, the ledger's run)."""
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
            **(storage_env or {}),
        })
        for key in ("CLINICAL_CRM_LEDGER_URL", "CLINICAL_CRM_REPORTS_DIR", "CLINICAL_CRM_STAGING_URL",
                    *(() if storage_env else ("CLINICAL_CRM_STORAGE_URL", "CLINICAL_CRM_STORAGE_CONN_ID"))):
            cluster.env.pop(key, None)
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
            index = cluster.get(f"/clinical-crm/{html.unescape(docs.group(1))}")
            assert index.ok and index.headers["content-type"].startswith("text/html"), index.status_code
            assert run_id in html.unescape(index.text), "the Data Docs index does not list the run"
            run_pages = re.findall(r'class="data-docs-run" href="([^"]+)"', row)
            assert run_pages, row  # the run's own validation pages
            for link in run_pages:
                served = cluster.get(f"/clinical-crm/{html.unescape(link)}")
                assert served.ok and served.headers["content-type"].startswith("text/html"), link
            if check is not None:
                check(cluster, run_id, data)
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
        return run_id, cfg, runs[0]


def test_connection_dag_runs_on_celery_workers(tmp_path, broker):
    def on_local_disk(cluster, run_id, data):
        assert (data / "reports" / "demo" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html").is_file()

    run_demo_dag(tmp_path, broker, check=on_local_disk)


def test_the_storage_root_on_object_storage(tmp_path, broker):
    """Everything the product writes goes to the bucket (moto's S3 server, on loopback), through
    the Airflow connection the Amazon provider's filesystem reads: staging, run files, the GX
    project and Data Docs; the api-server's page serves the run's Data Docs from there."""
    from support import STORAGE_CONN_ID, S3Server, storage_conn

    with S3Server() as s3:
        bucket = s3.new_bucket()
        env = {"CLINICAL_CRM_STORAGE_URL": f"s3://{bucket}/deploy",
               "CLINICAL_CRM_STORAGE_CONN_ID": STORAGE_CONN_ID,
               f"AIRFLOW_CONN_{STORAGE_CONN_ID.upper()}": storage_conn(s3.url)}

        def in_the_bucket(cluster, run_id, data):
            safe = file_safe(run_id)
            keys = s3.keys(bucket)
            runs = f"deploy/reports/demo/runs/{DAG_ID.split('__')[0]}/{safe}"
            for suffix in (".json", ".quarantine.csv", ".quarantine.json"):
                assert f"{runs}{suffix}" in keys, (suffix, keys)
            summary = json.loads(s3.read(bucket, f"{runs}.json"))
            assert summary["dag_run_id"] == run_id and summary["quarantine_csv"] == f"s3://{bucket}/{runs}.quarantine.csv"
            gx = "deploy/reports/demo/gx/uncommitted"
            assert [k for k in keys if k.startswith(f"{gx}/validations/") and f"/{run_id}/" in k], keys
            assert [k for k in keys if k.startswith(f"{gx}/data_docs/local_site/validations/") and f"/{run_id}/" in k]
            assert f"{gx}/data_docs/local_site/index.html" in keys
            assert summary["data_docs"] == f"s3://{bucket}/{gx}/data_docs/local_site/index.html"
            # staging went through the bucket (the extract's hand-off names it) and the run removed its files
            staged = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/extract/xcomEntries/"
                                        "return_value")
            assert staged.ok, staged.text
            paths = re.findall(r"[a-z0-9]+://[^'\"\s,}]+?\.parquet", staged.text)
            assert paths and all(p.startswith(f"s3://{bucket}/deploy/staging/demo/") for p in paths), paths
            assert not [k for k in keys if k.startswith(f"deploy/staging/demo/{DAG_ID.split('__')[0]}/{safe}/")]
            # nothing of it on the local disk
            assert not (data / "reports").exists() and not (data / "staging").exists(), sorted(data.rglob("*"))

        run_id, _, run = run_demo_dag(tmp_path, broker, env, check=in_the_bucket)
        assert run["dq_report"].startswith(f"s3://{bucket}/deploy/reports/demo/gx/")
