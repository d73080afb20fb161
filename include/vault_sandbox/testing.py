"""Test helper: run the real sandbox server in a subprocess on a free port.

    with SandboxServer("ctms", tmp_path / "ctms.db", seed="demo", burst_limit=50) as server:
        requests.post(f"{server.url}/api/v25.2/auth", data={...})
        server.admin.counters()

Keyword options become CLI options of ``python -m vault_sandbox serve`` (``burst_limit=50`` ->
``--burst-limit 50``; a list becomes a comma-separated value; ``True`` a bare flag).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from vault_sandbox.seed import DEMO_PASSWORD, INTEGRATION_USER

API = "v25.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Admin:
    """The sandbox's /sandbox/* endpoints, called with the integration user's session."""

    def __init__(self, url: str, username: str = INTEGRATION_USER, password: str = DEMO_PASSWORD):
        self.url = url
        self.username, self.password = username, password
        self.http = requests.Session()
        self.session_id: str | None = None

    def _login(self) -> None:
        body = self.http.post(f"{self.url}/api/{API}/auth",
                              data={"username": self.username, "password": self.password},
                              headers={"X-Sandbox-Admin": "1"}, timeout=30).json()
        if body.get("responseStatus") != "SUCCESS":
            raise RuntimeError(f"sandbox admin login failed: {body}")
        self.session_id = body["sessionId"]

    def call(self, method: str, path: str, payload: dict | None = None) -> dict:
        for _ in range(2):
            if self.session_id is None:
                self._login()
            body = self.http.request(method, f"{self.url}{path}", json=payload,
                                     headers={"Authorization": self.session_id}, timeout=30).json()
            if body.get("errors") and body["errors"][0]["type"] == "INVALID_SESSION_ID":
                self.session_id = None
                continue
            return body
        raise RuntimeError(f"sandbox admin call {method} {path} failed: {body}")

    def counters(self) -> dict:
        return self.call("GET", "/sandbox/counters")

    def reset_counters(self) -> dict:
        return self.call("POST", "/sandbox/counters/reset")

    def faults(self, **spec) -> dict:
        """faults() reads; faults(rate=0.1, kinds=[...], seed=1, queue=["http502"]) sets."""
        return self.call("POST", "/sandbox/faults", spec) if spec else self.call("GET", "/sandbox/faults")

    def expire_sessions(self, include_own: bool = False) -> int:
        body = self.call("POST", "/sandbox/sessions/expire", {"include_own": include_own})
        if include_own:
            self.session_id = None
        return body["expired"]

    def limits(self, **spec) -> dict:
        return self.call("POST", "/sandbox/limits", spec) if spec else self.call("GET", "/sandbox/limits")

    def downtime(self, **spec) -> dict:
        """downtime() reads; downtime(minutes=0.05) or downtime(seconds=2) starts a maintenance
        window now, downtime(minutes=0) ends it."""
        return self.call("POST", "/sandbox/downtime", spec) if spec else self.call("GET", "/sandbox/downtime")

    def latency(self, **spec) -> dict:
        """latency() reads; latency(profile="vault"), latency(query_ms=400, jitter=0), latency(seed=3) set."""
        return self.call("POST", "/sandbox/latency", spec) if spec else self.call("GET", "/sandbox/latency")


class SandboxServer:
    def __init__(self, app: str, db_path, seed: str = "demo", *, port: int | None = None,
                 startup_timeout: float = 60.0, **options):
        self.app = app
        self.db_path = Path(db_path)
        self.seed = seed
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.options = options
        self.process: subprocess.Popen | None = None
        self.admin = Admin(self.url)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vault_sandbox", "serve", "--app", self.app, "--port", str(self.port),
               "--db", str(self.db_path), "--seed", self.seed]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is False or value is None:
                continue
            elif isinstance(value, (list, tuple)):
                cmd += [flag, ",".join(map(str, value))]
            else:
                cmd += [flag, str(value)]
        return cmd

    def start(self) -> SandboxServer:
        self._log = open(self.db_path.with_suffix(".log"), "ab")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sandbox exited with {self.process.returncode}; see {self._log.name}")
            try:
                if requests.get(f"{self.url}/api/", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"sandbox did not answer within {self.startup_timeout}s; see {self._log.name}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
