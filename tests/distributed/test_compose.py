"""docker-compose.yaml validates with Debian's docker-compose (no engine needed) and has the layout."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init"}

pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="the docker-compose binary is absent (apt-get install docker-compose; scripts/setup.sh --test)")


def compose(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run([COMPOSE, "-f", str(REPO / "docker-compose.yaml"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = compose("config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_validates():
    result = compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_services_of_the_airflow_3_layout_and_the_two_vaults():
    result = compose("config", "--services")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert AIRFLOW_SERVICES | {"postgres", "redis", "vault-ctms", "vault-crm"} <= services


def test_airflow_services_run_celery_on_postgres_and_redis(resolved):
    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:airflow@postgres/"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert env["CLINICAL_CRM_LEDGER_URL"].startswith("postgresql+psycopg2://airflow:airflow@postgres/"), name
        assert "/opt/airflow/data" in [_volume_target(v) for v in services[name]["volumes"]], name
    assert services["airflow-worker"]["command"] in (["celery", "worker"], "celery worker")
    assert any(str(p.get("published", p) if isinstance(p, dict) else p).startswith("8080")
               for p in services["airflow-apiserver"]["ports"])


def test_init_service_runs_the_shared_init_script_and_the_vaults_serve_the_sandbox(resolved):
    services = resolved["services"]
    init = services["airflow-init"]
    assert "/opt/clinical-crm/scripts/airflow_init.sh" in " ".join(_as_list(init["command"]))
    assert init["environment"]["CTMS_VAULT_URL"] == "http://vault-ctms:8000"
    assert init["environment"]["CRM_VAULT_URL"] == "http://vault-crm:8000"
    assert "/opt/airflow/data" in [_volume_target(v) for v in services["vault-ctms"]["volumes"]]
    for app in ("ctms", "crm"):
        command = " ".join(_as_list(services[f"vault-{app}"]["entrypoint"]) + _as_list(services[f"vault-{app}"]["command"]))
        assert f"vault_sandbox serve --app {app}" in command
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker", "airflow-dag-processor"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def _as_list(value) -> list[str]:
    return value if isinstance(value, list) else str(value).split()


def _volume_target(volume) -> str:
    """`source:target[:mode]` (docker-compose 1.x) or {"target": ...} (newer formats)."""
    return volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]
