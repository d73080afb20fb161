"""Secrets and personal data; unauthenticated calls; permission denials.

- credentials come only from Airflow connections / the environment: no hard-coded password in
  the product's code (the sandbox's demo seed and the tests are the only places one is written);
- task logs (captured at file-descriptor level while dag.test() runs both DAGs), DQ reports
  (JSON summaries and Data Docs) and the ledger hold neither the passwords nor the session ids
  used (the real session ids, recorded as the client receives them, and anything shaped like one);
  person/account names and emails, and end users' emails, do not appear in task logs;
- every sandbox route except POST /api/{v}/auth and GET /api/ refuses a call without a session;
- a permission denial fails the task at once (try 1, no retries) with a clear message, and the
  ledger holds an outcome for each record the load touched.
"""
from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import requests

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")

SECRET = "Pw-7f9c1e!x#Q"          # the integration user's password in this test's vaults
SESSION_SHAPE = re.compile(r"\b[0-9A-F]{64}\b")


def set_password(db: Path, username: str, password: str) -> None:
    with sqlite3.connect(db) as conn:
        (user_id,) = conn.execute("SELECT id FROM user__sys WHERE username__sys = ?", (username,)).fetchone()
        conn.execute("UPDATE _credentials SET password = ? WHERE user_id = ?", (password, user_id))


def people(db: Path) -> set[str]:
    """Full names and emails of persons / accounts and of end users (not the integration login)."""
    found: set[str] = set()
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, first, last, email in (("person__sys", "first_name__sys", "last_name__sys", "email__sys"),
                                          ("account__v", "first_name__v", "last_name__v", None),
                                          ("user__sys", "first_name__sys", "last_name__sys", "email__sys")):
            if table not in tables:
                continue
            cols = f"{first}, {last}" + (f", {email}" if email else "")
            for row in conn.execute(f"SELECT {cols} FROM {table}"):
                if row[0] and row[1] and row[0] != "Integration":
                    found.add(f"{row[0]} {row[1]}")
                if email and row[2] and row[2] != harness.USER:
                    found.add(row[2])
    return found


# ---------------------------------------------------------------- hard-coded credentials


PASSWORD_LITERAL = re.compile(
    r"""(?ix)(password|passwd|pwd|secret|token)["']?\s*[:=]\s*["'](?!\s*["'])(?!\{)(?!<)[^"'\s]{3,}["']"""
    r"""|PASSWORD\s*=\s*[^=\n]*["'][^"'\s]{3,}["']""")


def test_no_hard_coded_passwords_in_the_product():
    hits = []
    for folder in ("include/clinical_crm", "dags", "plugins", "scripts", "bench"):
        for path in (harness.REPO / folder).rglob("*"):
            if path.suffix not in (".py", ".yaml", ".yml", ".sh", ".cfg", ".ini", ".toml", ".json", ".html"):
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if PASSWORD_LITERAL.search(line):
                    hits.append(f"{path.relative_to(harness.REPO)}:{n}: {line.strip()}")
    # Allowed: the local sandbox's public demo password ("sandbox") in demo scripts and benchmarks.
    allowed = [h for h in hits if h.startswith(("scripts/", "bench/")) and re.search(r"[\"']sandbox[\"']", h)]
    # Not literals: a password read from the environment (airflow_init.sh's admin password, which
    # has no default) or passed to psql as a variable (scripts/postgres/init-ledger.sh).
    allowed += [h for h in hits if re.search(r"""os\.environ\["[A-Z_]+"\]|="\$[A-Z_]+"|PASSWORD :'password'""", h)]
    assert not [h for h in hits if h not in allowed], hits
    # the connection files hold Airflow connection ids only
    for path in (harness.REPO / "include" / "connections").glob("*.yaml"):
        assert not re.search(r"(?i)password|login|secret", path.read_text()), path


# ---------------------------------------------------------------- logs, reports, ledger


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, airflow_db):
    base = tmp_path_factory.mktemp("secrets")
    folder = harness.copy_world(harness.seed_world(base / "seed", 100), base / "w")
    for app in ("ctms", "crm"):
        set_password(folder / f"{app}.db", harness.USER, SECRET)
    return folder


def test_no_secret_or_personal_data_in_logs_reports_or_ledger(secret_run, capfd, caplog):
    from clinical_crm.vault.client import VaultClient

    sessions: list[str] = []
    original = VaultClient._authenticate_once

    def recording(self):
        session = original(self)
        sessions.append(session)
        return session

    caplog.set_level("DEBUG")
    VaultClient._authenticate_once = recording
    try:
        with harness.World(secret_run, password=SECRET) as world:
            states = world.run_both(harness.wide_window())
    finally:
        VaultClient._authenticate_once = original
    out, err = capfd.readouterr()
    logs = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert all(state == "success" for state, _ in states.values()), states
    assert sessions and len(logs) > 10_000
    assert "Authenticated to" in logs  # the logs were captured

    def leaks(text: str) -> list[str]:
        found = [s for s in [SECRET, *sessions] if s in text]
        return found + SESSION_SHAPE.findall(text)

    assert not leaks(logs), "secret or session id in task logs"
    data = secret_run / "data"
    reports = [p for p in (data / "reports").rglob("*") if p.is_file()]
    assert any(p.suffix == ".json" for p in reports) and any(p.suffix == ".html" for p in reports)
    for path in reports:
        assert not leaks(path.read_text(errors="replace")), path
    with sqlite3.connect(data / "ledger.db") as conn:
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                assert not leaks(" ".join(map(str, row))), (table, row)
    personal = people(secret_run / "ctms.db") | people(secret_run / "crm.db")
    assert len(personal) >= 10
    assert not sorted(p for p in personal if p in logs), "person names / emails in task logs"


# ---------------------------------------------------------------- unauthenticated calls


def _routes():
    from fastapi.routing import APIRoute

    from vault_sandbox.app import create_app

    import tempfile

    app = create_app("ctms", str(Path(tempfile.mkdtemp()) / "routes.db"))
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                yield method, route.path


PUBLIC = {("POST", "/api/{version}/auth"), ("GET", "/api"), ("GET", "/api/")}
VALUES = {"version": "v25.2", "object_name": "crm_activity__v", "record_id": "V1A0000000000001",
          "query_id": "00000000-0000-0000-0000-000000000000", "user_id": "me", "component": "Objecttype"}


@pytest.fixture(scope="module")
def ctms_server(tmp_path_factory):
    from vault_sandbox.testing import SandboxServer

    with SandboxServer("ctms", tmp_path_factory.mktemp("ctms") / "ctms.db", seed="demo") as server:
        yield server


def test_every_route_but_auth_and_versions_needs_a_session(ctms_server):
    routes = [r for r in _routes() if r not in PUBLIC]
    assert len(routes) >= 20 and any(p.startswith("/sandbox") for _, p in routes)
    for method, path in routes:
        url = ctms_server.url + path.format(**VALUES)
        for headers in ({}, {"Authorization": "Bearer not-a-session"}, {"Authorization": "0" * 64}):
            response = requests.request(method, url, headers=headers, json=[{"name__v": "x"}], timeout=10)
            body = response.json()
            assert body.get("responseStatus") == "FAILURE", (method, path, headers, body)
            assert body["errors"][0]["type"] == "INVALID_SESSION_ID", (method, path, body)
    for method, path in PUBLIC - {("GET", "/api")}:
        assert requests.request(method, ctms_server.url + path.format(**VALUES), timeout=10).status_code == 200
    # and nothing was written by all those calls
    assert ctms_server.admin.counters()["endpoints"].get("POST /api/{version}/vobjects/crm_activity__v", 0) >= 1
    with sqlite3.connect(ctms_server.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM crm_activity__v WHERE name__v = 'x'").fetchone()[0] == 0


# ---------------------------------------------------------------- permission denial


@pytest.mark.parametrize("dag_id, vault, user, target", [
    # CTMS user whose profile may read but not create Medical Activities: each record is refused
    ("crm_to_ctms__demo", "ctms", "clinops@sandbox.example", "call2__v"),
    # CRM read-only user: the whole write call is refused
    ("ctms_to_crm__demo", "crm", "crmreadonly@sandbox.example", "clinical_study__v"),
])
def test_permission_denial_fails_at_once_and_reports_every_record(small_world, tmp_path, dag_id, vault, user, target):
    import os

    folder = harness.copy_world(small_world, tmp_path / "w")
    with harness.World(folder) as world:
        url = world.ctms.url if vault == "ctms" else world.crm.url
        os.environ[f"AIRFLOW_CONN_VAULT_{vault.upper()}_DEMO"] = harness.vault_conn(url, login=user)
        dr = world.run_dag(dag_id, harness.wide_window())
        tries = {ti.task_id: (ti.state, ti.try_number) for ti in dr.get_task_instances()}
        run, outcomes = world.last_run("SELECT outcome, error_type, count(*) FROM record_outcomes "
                                       "WHERE run_id = :run GROUP BY outcome, error_type")
    assert dr.state == "failed"
    assert tries["load"] == ("failed", 1), tries  # no retries
    assert all(state == "success" for t, (state, _) in tries.items() if t not in ("load", "finish")), tries
    assert run["state"] == "failed"
    assert "INSUFFICIENT_ACCESS" in run["message"] and target in run["message"], run["message"]
    assert "permission" in run["message"]
    written = harness.snapshot(folder / f"{vault}.db")
    reference = harness.snapshot(small_world / f"{vault}.db")
    assert written == reference, "a refused load left records behind"
    assert not [o for o in outcomes if o[0] in ("created", "updated")], outcomes
    refused = sum(n for outcome, error, n in outcomes if outcome == "failed" and error == "INSUFFICIENT_ACCESS")
    if vault == "ctms":  # refused record by record: every staged call has its "failed" outcome
        assert refused == 60, outcomes
    else:               # the first write call refused as a whole: nothing written, no record outcomes
        assert refused == 0, outcomes


@pytest.fixture(scope="module")
def small_world(tmp_path_factory, airflow_db):
    return harness.seed_world(tmp_path_factory.mktemp("small"), 60)
