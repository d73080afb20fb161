"""docker-compose.yaml validates with Debian's docker-compose (no engine needed) and has the layout;
its secrets come only from the .env that scripts/make_env.sh writes."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
AIRFLOW_SERVICES = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init"}
SECRETS = {"AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD",
           "AIRFLOW_DB_PASSWORD", "LEDGER_DB_PASSWORD", "VAULT_PASSWORD"}

needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="the docker-compose binary is absent (apt-get install docker-compose; scripts/setup.sh --test)")


def make_env(path: Path) -> dict[str, str]:
    subprocess.run(["bash", str(REPO / "scripts" / "make_env.sh"), str(path)], check=True, capture_output=True,
                   timeout=60)
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # only the .env given: nothing from this process's environment fills a secret in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_")) and k not in SECRETS}
    return subprocess.run([COMPOSE, "-f", str(REPO / "docker-compose.yaml"), "--env-file", str(env_file), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("compose") / ".env"
    return path, make_env(path)


@pytest.fixture(scope="module")
def resolved(generated_env) -> dict:
    result = compose(generated_env[0], "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_make_env_writes_every_secret_fresh_and_private(tmp_path, generated_env):
    from cryptography.fernet import Fernet

    path, values = generated_env
    assert SECRETS <= values.keys()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    Fernet(values["AIRFLOW_FERNET_KEY"])  # a valid key
    generated = [values[name] for name in SECRETS - {"VAULT_PASSWORD"}]  # the sandbox's is its demo user's
    assert len(set(generated)) == len(generated) and all(len(v) >= 24 for v in generated)
    again = make_env(tmp_path / ".env")
    assert all(again[name] != values[name] for name in SECRETS - {"VAULT_PASSWORD"})  # generated, not fixed
    refused = subprocess.run(["bash", str(REPO / "scripts" / "make_env.sh"), str(tmp_path / ".env")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not overwritten" in refused.stderr
    assert ".env" in (REPO / ".gitignore").read_text().split() and ".env" in (REPO / ".dockerignore").read_text().split()


def test_no_literal_secret_in_the_compose_file():
    text = (REPO / "docker-compose.yaml").read_text()
    for name in SECRETS:  # every secret is required: ${NAME:?...}, never ${NAME:-default} or absent
        uses = re.findall(r"\$\{" + name + r"(:?[-?])?([^}]*)\}", text)
        assert uses, f"{name} is not used"
        assert all(op == ":?" and "scripts/make_env.sh" in message for op, message in uses), (name, uses)
    # no credentials written into a URL, and no value of a secret-looking key that is not a ${...}
    for user, password in re.findall(r"://([^:/@\s]+):([^@\s]*)@", text):
        assert password.startswith("${") and password.endswith("}"), f"literal password for {user} in a URL"
    for key, value in re.findall(r"^\s+([A-Z_]*(?:PASSWORD|SECRET|FERNET_KEY)[A-Z_]*):\s*(.+)$", text, flags=re.M):
        if not key.endswith("_FILE"):  # a file's path is not the secret
            assert value.strip().startswith("${"), f"{key} has a literal value"
    assert "airflow:airflow@" not in text and "change-this" not in text


@needs_compose
def test_compose_refuses_to_start_without_the_env_naming_the_script(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose(empty, "config", "-q")
    assert result.returncode != 0
    assert "run scripts/make_env.sh to write .env" in result.stderr, result.stderr


@needs_compose
def test_the_generated_secrets_reach_the_services(resolved, generated_env):
    _, values = generated_env
    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__FERNET_KEY"] == values["AIRFLOW_FERNET_KEY"], name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW_JWT_SECRET"], name
        assert env["AIRFLOW__API__SECRET_KEY"] == values["AIRFLOW_API_SECRET_KEY"], name
        assert f"airflow:{values['AIRFLOW_DB_PASSWORD']}@postgres/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == values["AIRFLOW_DB_PASSWORD"]
    assert services["airflow-init"]["environment"]["AIRFLOW_ADMIN_PASSWORD"] == values["AIRFLOW_ADMIN_PASSWORD"]


@needs_compose
def test_the_ledger_has_its_own_database_and_role(resolved, generated_env):
    _, values = generated_env
    services = resolved["services"]
    postgres = services["postgres"]
    assert postgres["environment"]["LEDGER_DB_PASSWORD"] == values["LEDGER_DB_PASSWORD"]
    assert "/docker-entrypoint-initdb.d/init-ledger.sh" in [_volume_target(v) for v in postgres["volumes"]]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW_CONN_CLINICAL_CRM_LEDGER"] == (
            f"postgresql://clinical_crm_ledger:{values['LEDGER_DB_PASSWORD']}@postgres:5432/clinical_crm_ledger"), name
        assert "CLINICAL_CRM_LEDGER_URL" not in env, name  # not in Airflow's database, not as its superuser


@needs_compose
def test_compose_file_validates(generated_env):
    result = compose(generated_env[0], "config", "-q")
    assert result.returncode == 0, result.stderr


@needs_compose
def test_services_of_the_airflow_3_layout_and_the_two_vaults(generated_env):
    result = compose(generated_env[0], "config", "--services")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert AIRFLOW_SERVICES | {"postgres", "redis", "vault-ctms", "vault-crm"} <= services


@needs_compose
def test_airflow_services_run_celery_on_postgres_and_redis(resolved):
    services = resolved["services"]
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name
        assert "/opt/airflow/data" in [_volume_target(v) for v in services[name]["volumes"]], name
    assert services["airflow-worker"]["command"] in (["celery", "worker"], "celery worker")
    assert any(str(p.get("published", p) if isinstance(p, dict) else p).startswith("8080")
               for p in services["airflow-apiserver"]["ports"])


@needs_compose
def test_init_service_runs_the_shared_init_script_and_the_vaults_serve_the_sandbox(resolved):
    services = resolved["services"]
    init = services["airflow-init"]
    assert "/opt/clinical-crm/scripts/airflow_init.sh" in " ".join(_as_list(init["command"]))
    assert init["environment"]["CTMS_VAULT_URL"] == "http://vault-ctms:8000"
    assert init["environment"]["CRM_VAULT_URL"] == "http://vault-crm:8000"
    assert "/opt/airflow/data" in [_volume_target(v) for v in services["vault-ctms"]["volumes"]]
    for app in ("ctms", "crm"):
        service = services[f"vault-{app}"]
        command = " ".join(_as_list(service["entrypoint"]) + _as_list(service["command"]))
        assert f"vault_sandbox serve --app {app}" in command
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-worker", "airflow-dag-processor"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def _as_list(value) -> list[str]:
    return value if isinstance(value, list) else str(value).split()


def _volume_target(volume) -> str:
    """`source:target[:mode]` (docker-compose 1.x) or {"target": ...} (newer formats)."""
    return volume["target"] if isinstance(volume, dict) else str(volume).split(":")[1]
