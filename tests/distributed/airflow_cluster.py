"""A distributed Airflow on this machine: scheduler, api-server, dag-processor and a Celery worker.

Used by test_celery.py. Every process runs in its own process group and is stopped with it; logs go
to files under the temporary AIRFLOW_HOME so a failing test can show them.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from base64 import urlsafe_b64encode
from pathlib import Path

import requests

from clinical_crm.settings import airflow_sqlite_env
from support import LedgerDatabase, PostgresDatabase  # noqa: F401  (test_celery imports them from here)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
INIT_SCRIPT = REPO / "scripts" / "airflow_init.sh"
REDIS_URL = "redis://127.0.0.1:6379"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    """Call check() until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


class AirflowCluster:
    """Environment and processes of one Airflow deployment with the CeleryExecutor."""

    def __init__(self, home: Path, database_url: str, redis_db: int, dags_folder: Path, extra_env: dict[str, str]):
        self.home = home
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.redis_db = redis_db
        self.processes: dict[str, subprocess.Popen] = {}
        self.admin_password = secrets.token_urlsafe(12)
        self._token: str | None = None
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__FERNET_KEY": urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            # Admin access as in docker-compose: airflow_init.sh writes the password file.
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "simple_auth_manager_passwords.json"),
            "AIRFLOW_ADMIN_PASSWORD": self.admin_password,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CELERY__BROKER_URL": f"{REDIS_URL}/{redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + database_url,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            **extra_env,
        }
        self.env.pop("AIRFLOW_CONFIG", None)
        for key in airflow_sqlite_env():  # the tests' SQLite lock wait: not for PostgreSQL
            self.env.pop(key, None)

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout)

    def init(self) -> None:
        """The same script the docker-compose airflow-init service runs."""
        result = self.run("bash", str(INIT_SCRIPT), timeout=600)
        (self.home / "airflow-init.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"airflow_init.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    def start(self, name: str, *args: str) -> None:
        log = open(self.log_path(name), "w")
        self.processes[name] = subprocess.Popen(
            [AIRFLOW, *args], env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_all(self) -> None:
        self.start("api-server", "api-server", "--port", str(self.api_port), "--host", "127.0.0.1")
        wait_until(self._api_ready, 120, "the api-server")
        self.start("dag-processor", "dag-processor")
        self.start("scheduler", "scheduler")
        self.start("celery-worker", "celery", "worker", "--concurrency", "2")

    def _api_ready(self) -> bool:
        self.check_alive()
        try:
            return requests.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).ok
        except requests.RequestException:
            return False

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 4000) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def all_logs(self) -> str:
        names = ["airflow-init", *self.processes]
        return "\n".join(f"----- {name} -----\n{self.tail(name, 3000)}" for name in names)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.processes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        # Children of a group leader that already exited (e.g. gunicorn/celery pool workers).
        for proc in self.processes.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- the REST API, as the admin user the init script gave access to ---

    def token(self) -> str:
        if self._token is None:
            response = requests.post(f"{self.api_url}/auth/token", timeout=30,
                                     json={"username": "admin", "password": self.admin_password})
            assert response.status_code == 201, f"admin login failed: {response.status_code} {response.text}"
            self._token = response.json()["access_token"]
        return self._token

    def get(self, path: str, **kwargs) -> requests.Response:
        """GET any api-server path (e.g. a plugin page) as the admin user."""
        return requests.get(f"{self.api_url}{path}", headers={"Authorization": f"Bearer {self.token()}"},
                            timeout=60, **kwargs)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, f"{self.api_url}/api/v2{path}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token()}"}, **kwargs)

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        def parsed():
            self.check_alive()
            return self.api("GET", f"/dags/{dag_id}").status_code == 200

        try:
            wait_until(parsed, timeout, f"the dag-processor to parse {dag_id}", interval=2)
        except TimeoutError as error:
            import_errors = self.api("GET", "/importErrors").text
            raise TimeoutError(f"{error}; import errors: {import_errors[:3000]}") from None

    def trigger(self, dag_id: str, logical_date: str | None) -> str:
        response = self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        response.raise_for_status()
        response = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": logical_date})
        response.raise_for_status()
        return response.json()["dag_run_id"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        def finished():
            self.check_alive()
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        return wait_until(finished, timeout, f"{dag_id} run {run_id} to finish", interval=3)

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        items = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
        return {ti["task_id"]: ti["state"] for ti in items}
