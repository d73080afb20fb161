"""Shared machinery of the reliability tests and of scripts/fault_run.py.

A *world* is a pair of sandbox vault databases (CTMS + CRM) plus the connection file, ledger,
staging and reports folders of one connection run against them. Worlds are seeded once and
copied, so a reference (fault-free) run and a faulty run start from byte-identical databases.

    folder = seed_world(tmp / "seed", n=1000)        # scale scenario + n flagged CRM calls
    ref = copy_world(folder, tmp / "ref")
    with World(ref) as w:                              # two SandboxServer processes, env set
        w.run_both()                                   # both DAGs with dag.test()
    snapshot(ref)                                      # normalised full contents of both vaults

Nothing here asserts; tests do.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "integration@sandbox.example", "sandbox"
DAGS = ("ctms_to_crm__demo", "crm_to_ctms__demo")

# Columns whose values legitimately differ between two runs over identical copies.
VOLATILE = {"id", "global_id__sys", "created_date__v", "modified_date__v", "link__sys"}


def _python() -> str:
    return sys.executable


def seed_world(folder: Path, n: int, now: datetime | None = None, seed_number: int = 7,
               calls: int | None = None) -> Path:
    """Seed the scale scenario (n Clinical Activities) in both vaults and add `calls` (default n)
    CRM calls flagged for Vault Clinical on the scale accounts. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    now = now or datetime.now(timezone.utc)
    for app in ("ctms", "crm"):
        subprocess.run([_python(), "-m", "vault_sandbox", "seed", "--app", app, "--db", str(folder / f"{app}.db"),
                        "--scenario", "scale", "--activities", str(n), "--seed-number", str(seed_number),
                        "--now", now.strftime("%Y-%m-%dT%H:%M:%SZ")],
                       check=True, capture_output=True, timeout=600)
    add_calls(folder / "crm.db", n if calls is None else calls, now, seed_number)
    return folder


def add_calls(crm_db: Path, count: int, now: datetime, seed_number: int = 7) -> None:
    """`count` calls on the scale accounts, straight into the CRM sandbox's SQLite file (the
    sandbox's own bulk loader fills the standard fields), modified in the hour before `now`."""
    from vault_sandbox.db import Store
    from vault_sandbox.models import load_model
    from vault_sandbox.seed import CALL_SUBJECTS, CHANNELS, _Loader, scale_window

    store = Store(load_model("crm"), str(crm_db))
    rng = random.Random(seed_number)
    start, end = scale_window(now)
    with store.write_lock, store.engine.begin() as conn:
        accounts = [r[0] for r in conn.execute(store.table("account__v").select().with_only_columns(
            store.table("account__v").c.id).order_by(store.table("account__v").c.id))]
        users = dict(conn.execute(store.table("user__sys").select().with_only_columns(
            store.table("user__sys").c.username__sys, store.table("user__sys").c.id)).all())
        loader = _Loader(store, conn)
        rows, stamps = [], []
        for i in range(count):
            modified = start + timedelta(seconds=rng.random() * 3599)
            stamps.append((modified, modified))
            rows.append({"account__v": accounts[i % len(accounts)],
                         "call_date__v": (now - timedelta(days=i % 20)).strftime("%Y-%m-%d"),
                         "call_channel__v": CHANNELS[i % len(CHANNELS)],
                         "call2_status__v": ("planned__v", "saved__v", "submitted__v")[i % 3],
                         "subject__v": CALL_SUBJECTS[i % len(CALL_SUBJECTS)],
                         "send_to_vault_clinical__v": True})
        loader.insert("call2__v", rows, created_by=[users["medical@sandbox.example"],
                                                    users["lena.fischer@sandbox.example"]], stamps=stamps)
    store.engine.dispose()


def copy_world(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for app in ("ctms", "crm"):
        shutil.copy(source / f"{app}.db", target / f"{app}.db")
    return target


def connection_file(folder: Path, **load: int) -> Path:
    """The demo connection file with load settings changed (e.g. batch_size=100)."""
    data = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
    data["load"].update(load)
    directory = folder / "connections"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "demo.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return directory


def vault_conn(url: str, login: str = USER, password: str = PASSWORD, **extra) -> str:
    body = {"conn_type": "veeva_vault", "host": url, "login": login, "password": password}
    if extra:
        body["extra"] = json.dumps(extra)
    return json.dumps(body)


def world_env(folder: Path, ctms_url: str, crm_url: str, conn_extra: dict | None = None,
              password: str = PASSWORD) -> dict[str, str]:
    """The environment of one connection run against this world's two vaults."""
    extra = conn_extra or {}
    return {
        "AIRFLOW_CONN_VAULT_CTMS_DEMO": vault_conn(ctms_url, password=password, **extra),
        "AIRFLOW_CONN_VAULT_CRM_DEMO": vault_conn(crm_url, password=password, **extra),
        "CLINICAL_CRM_DATA_DIR": str(folder / "data"),
        "CLINICAL_CRM_LEDGER_URL": f"sqlite:///{folder / 'data' / 'ledger.db'}",
        "CLINICAL_CRM_CONNECTIONS_DIR": str(folder / "connections"),
        "CLINICAL_CRM_RETRY_DELAY_SECONDS": "1",
    }


@contextlib.contextmanager
def patched_env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class World:
    """Both sandbox vaults of a world, served (optionally with faults), and the env to run DAGs."""

    def __init__(self, folder: Path, faults: dict | None = None, limits: dict | None = None,
                 server_options: dict | None = None, conn_extra: dict | None = None,
                 password: str = PASSWORD, **load):
        self.folder = Path(folder)
        self.password = password
        self.faults = faults
        self.limits = limits
        self.server_options = server_options or {}
        self.conn_extra = conn_extra
        connection_file(self.folder, **(load or {"batch_size": 500}))
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> World:
        from vault_sandbox.testing import SandboxServer

        self.ctms = self._stack.enter_context(SandboxServer("ctms", self.folder / "ctms.db", seed="none",
                                                            **self.server_options))
        self.crm = self._stack.enter_context(SandboxServer("crm", self.folder / "crm.db", seed="none",
                                                           **self.server_options))
        for server in (self.ctms, self.crm):
            server.admin.password = self.password
        self.env = world_env(self.folder, self.ctms.url, self.crm.url, self.conn_extra, self.password)
        self._stack.enter_context(patched_env(self.env))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @property
    def servers(self):
        return (self.ctms, self.crm)

    def arm(self) -> None:
        """Switch the faults and limits on (after setup calls, so setup is not disturbed)."""
        for server in self.servers:
            server.admin.reset_counters()
            if self.limits:
                server.admin.limits(**self.limits, reset_windows=True)
            if self.faults:
                server.admin.faults(**self.faults)

    def disarm(self) -> dict:
        """Switch faults off; return the sandbox counters of both vaults."""
        counters = {}
        for name, server in (("ctms", self.ctms), ("crm", self.crm)):
            server.admin.faults(rate=0.0, queue=[])
            server.admin.limits(burst_limit=100000, reset_windows=True)
            counters[name] = server.admin.counters()
        return counters

    def run_dag(self, dag_id: str, window: tuple[datetime, datetime] | None = None,
                logical_date: datetime | None = None):
        from clinical_crm.airflow.dag_factory import build_dags

        dag = build_dags()[dag_id]
        conf = {}
        if window:
            conf = {"window_start": window[0].isoformat(), "window_end": window[1].isoformat()}
        return dag.test(run_conf=conf, logical_date=logical_date or datetime.now(timezone.utc))

    def run_both(self, window: tuple[datetime, datetime]) -> dict:
        """ctms_to_crm then crm_to_ctms over the window; returns {dag_id: (state, {task: try_number})}."""
        result = {}
        for dag_id in DAGS:
            dr = self.run_dag(dag_id, window)
            result[dag_id] = (dr.state, {ti.task_id: ti.try_number for ti in dr.get_task_instances()})
        return result

    def ledger(self):
        from clinical_crm.engine.ledger import Ledger

        return Ledger(self.env["CLINICAL_CRM_LEDGER_URL"])

    def last_run(self, sql: str) -> tuple[dict, list]:
        """The ledger's newest run, and the rows of `sql` about it (`:run` is its run id)."""
        from sqlalchemy import text

        ledger = self.ledger()
        run = ledger.recent_runs("demo", limit=1)[0]
        with ledger.engine.connect() as db:
            return run, db.execute(text(sql), {"run": run["run_id"]}).all()


def wide_window(now: datetime | None = None) -> tuple[datetime, datetime]:
    now = now or datetime.now(timezone.utc)
    return now - timedelta(days=2), now + timedelta(minutes=5)


# ---------------------------------------------------------------- end-state comparison


def snapshot(db_path: Path) -> dict[str, Counter]:
    """Every row of every object table of a sandbox vault, normalised so that two runs over
    identical copies compare equal when they wrote the same records: volatile columns dropped,
    ids replaced by a stable key (the record's external id when it has one, else its id, which
    is the same in both copies for records that existed before the run). A table is a multiset
    of rows, so a duplicate shows as a count of 2."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                  if not r[0].startswith(("_", "sqlite"))]
        keys: dict[str, str] = {}
        data: dict[str, list[dict]] = {}
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [c[0] for c in cursor.description]
            rows = [dict(zip(columns, r)) for r in cursor]
            data[table] = rows
            for row in rows:
                key = row.get("external_id__v") or row["id"]
                keys[row["id"]] = f"{table}:{key}"
        out: dict[str, Counter] = {}
        for table, rows in data.items():
            normalised = Counter()
            for row in rows:
                clean = {}
                for column, value in row.items():
                    if column in VOLATILE:
                        continue
                    if column == "name__v" and value == row["id"]:
                        value = "<own id>"
                    elif isinstance(value, str) and value in keys:
                        value = keys[value]
                    clean[column] = value
                normalised[json.dumps(clean, sort_keys=True, default=str)] += 1
            out[table] = normalised
        return out
    finally:
        conn.close()


def compare(reference: dict[str, Counter], actual: dict[str, Counter]) -> dict[str, dict]:
    """Per table: rows missing from `actual`, rows extra in `actual` (duplicates count), totals."""
    report = {}
    for table in sorted(set(reference) | set(actual)):
        ref, act = reference.get(table, Counter()), actual.get(table, Counter())
        missing, extra = ref - act, act - ref
        report[table] = {"rows": sum(ref.values()), "actual_rows": sum(act.values()),
                         "missing": sum(missing.values()), "extra": sum(extra.values()),
                         "examples": [json.loads(k) for k in list(missing)[:2] + list(extra)[:2]]}
    return report


def total_rows(snap: dict[str, Counter]) -> int:
    return sum(sum(c.values()) for c in snap.values())


def fault_totals(counters: dict) -> Counter:
    total = Counter()
    for c in counters.values():
        total.update(c.get("faults", {}))
    return total


# ---------------------------------------------------------------- client counters


@contextlib.contextmanager
def client_counters():
    """Sum the counters of every VaultClient closed meanwhile (the DAG tasks close theirs)."""
    from clinical_crm.vault.client import VaultClient

    totals: Counter = Counter()
    original = VaultClient.close

    def close(self):
        totals.update(self.counters)
        self.counters.clear()
        original(self)

    VaultClient.close = close
    try:
        yield totals
    finally:
        VaultClient.close = original


# ---------------------------------------------------------------- the fault run


ALL_FAULTS = ["exception", "http502", "http503", "drop", "slow", "session_expiry", "race_condition"]
CALL_FAULTS = ALL_FAULTS[:-1]


def change_sources(world: World, share: float) -> dict[str, int]:
    """The second window's changes, the same in every copy of a world: `share` of the Clinical
    Activities and of the flagged CRM calls deleted, as many others given a new subject (updates,
    so per-record faults also hit updates and deletion marks). Records are picked by id: the
    copies have the same ids."""
    from clinical_crm.vault import VaultClient

    changed = {}
    for server, obj, where in ((world.ctms, "crm_activity__v", "object_type__vr.api_name__v = 'clinical_activity__v'"),
                               (world.crm, "call2__v", "send_to_vault_clinical__v = true")):
        with VaultClient(server.url, USER, world.password) as client:
            ids = sorted(r["id"] for page in client.query(f"SELECT id FROM {obj} WHERE {where}") for r in page.records)
            count = int(len(ids) * share)
            deleted, updated = ids[:count], ids[count:2 * count]
            for i in range(0, len(updated), 500):
                outcomes = client.update(obj, [{"id": r, "subject__v": f"changed {r}"} for r in updated[i:i + 500]])
                assert all(o.outcome == "updated" for o in outcomes), outcomes[:3]
        for record_id in deleted:
            body = server.admin.call("DELETE", f"/api/v25.2/vobjects/{obj}/{record_id}")
            assert body["responseStatus"] == "SUCCESS", body
        changed[obj] = {"deleted": len(deleted), "updated": len(updated)}
    return changed


def ledger_against_vault(folder: Path, ledger) -> dict[str, int]:
    """What the ledger says, checked against what the target vaults hold: every target id the id
    map holds exists; every deletion mark the queue calls applied is on its target record."""
    from sqlalchemy import select

    from clinical_crm.engine.ledger import deletion_queue, id_map

    def rows(app: str, table: str, columns: str) -> list[tuple]:
        with sqlite3.connect(f"file:{folder / f'{app}.db'}?mode=ro", uri=True) as conn:
            return conn.execute(f"SELECT {columns} FROM {table}").fetchall()

    present = {r[0] for app, table in (("crm", "clinical_interaction__v"), ("crm", "clinical_study__v"),
                                       ("crm", "clinical_site__v"), ("ctms", "crm_activity__v"))
               for r in rows(app, table, "id")}
    marked = {r[0] for r in rows("crm", "clinical_interaction__v", "external_id__v, subject__v")
              if (r[1] or "").endswith(" Deleted")}
    marked |= {r[0] for r in rows("ctms", "crm_activity__v", "external_id__v, status__v") if r[1] == "inactive__v"}
    with ledger.engine.connect() as db:
        mapped = [r.target_id for r in db.execute(select(id_map.c.target_id)) if r.target_id]
        queue = db.execute(select(deletion_queue.c.global_id, deletion_queue.c.state)).all()
    return {"mapped": len(mapped), "mapped_missing_in_vault": sum(t not in present for t in mapped),
            "deletions_applied": sum(s == "applied" for _, s in queue),
            "deletions_pending": sum(s == "pending" for _, s in queue),
            "applied_without_mark_in_vault": sum(s == "applied" and g not in marked for g, s in queue)}


def fault_run(base: Path, n: int, rate: float = 0.10, fault_seed: int = 11, batch_size: int = 100,
              concurrency: int = 4,
              page_size: int = 200, burst_limit: int = 40, burst_window_seconds: float = 5,
              burst_delay_ms: int = 100, slow_seconds: float = 0.5, every_kind_first: bool = True,
              change_share: float = 0.1, heal: bool = True, log=print) -> dict:
    """Seed n records per direction, run both DAGs fault-free on one copy and with faults on an
    identical copy, and compare the full contents of both vaults. Returns the report.

    Two windows: the first sends everything; then `change_share` of the records of each direction
    are deleted and as many updated (change_sources), and the second window sends the updates and
    the deletion marks, faults still on. With `heal`, a fault-free run follows (what a faulty run
    left queued or quarantined goes through), and the comparison is made after it; without it,
    right after the faulty runs. The ledger is checked against the vaults (ledger_against_vault).

    `every_kind_first`: each vault's first six calls get one fault of every call-level kind (the sandbox's fault
    queue), so every kind is exercised whatever the random draws; then the seeded 10% follow."""
    now = datetime.now(timezone.utc)
    log(f"seeding {n} Clinical Activities and {n} flagged CRM calls ...")
    seed_world(base / "seed", n, now)
    window = wide_window(now)
    server_options = {"page_size": page_size}
    snapshots, report = {}, {"n": n, "fault_rate": rate, "fault_seed": fault_seed, "batch_size": batch_size,
                             "concurrency": concurrency, "page_size": page_size, "burst_limit": burst_limit,
                             "burst_window_seconds": burst_window_seconds}
    for name in ("reference", "faults"):
        folder = copy_world(base / "seed", base / name)
        faulty = name == "faults"
        world = World(folder, server_options=server_options, batch_size=batch_size, concurrency=concurrency,
                      faults={"rate": rate, "kinds": ALL_FAULTS, "seed": fault_seed,
                              "slow_seconds": slow_seconds,
                              # race conditions are per record (hundreds at 10%); a queued one would
                              # hold back every other fault until the vault's first write call
                              "queue": CALL_FAULTS if every_kind_first else []} if faulty else None,
                      limits={"burst_limit": burst_limit, "burst_window_seconds": burst_window_seconds,
                              "burst_delay_ms": burst_delay_ms} if faulty else None,
                      conn_extra={"burst_floor": 5, "burst_window_seconds": burst_window_seconds} if faulty else None)
        log(f"{name} run ...")
        with world, client_counters() as clients:
            world.arm()
            phases = [world.run_both(window)]
            counters = world.disarm()
            changed = change_sources(world, change_share) if change_share else {}
            if changed:
                log(f"{name}: second window: {changed}")
                world.arm()
                phases.append(world.run_both(wide_window()))
                counters = merge_counters(counters, world.disarm())
            healed = world.run_both(wide_window()) if heal else {}
            runs = world.ledger().recent_runs("demo", limit=10)
            agreement = ledger_against_vault(folder, world.ledger())
        snapshots[name] = {app: snapshot(folder / f"{app}.db") for app in ("ctms", "crm")}
        report[name] = {
            "dag_runs": {dag: {"state": "success" if all(p[dag][0] == "success" for p in phases) else "failed",
                               "tries": [p[dag][1] for p in phases]} for dag in DAGS},
            "faults_injected": dict(fault_totals(counters)),
            "api_calls": sum(c["total"] for c in counters.values()),
            "auth_calls": sum(c["auth"] for c in counters.values()),
            "client": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in sorted(clients.items())},
            "task_retries": sum(t - 1 for p in phases for _, tries in p.values() for t in tries.values()),
            "ledger": [{"direction": r["direction"], "state": r["state"], "counts": r["counts"]} for r in runs],
            "changed": changed,
            "healing_runs": {dag: str(state) for dag, (state, _) in healed.items()},
            "ledger_against_vault": agreement,
        }
    comparison = {app: compare(snapshots["reference"][app], snapshots["faults"][app]) for app in ("ctms", "crm")}
    report["comparison"] = comparison
    report["records_checked"] = sum(t["rows"] for c in comparison.values() for t in c.values())
    report["records_written_by_runs"] = {
        app: {t: r["rows"] for t, r in c.items()
              if t in ("clinical_interaction__v", "clinical_study__v", "clinical_site__v", "crm_activity__v")}
        for app, c in comparison.items()}
    report["missing"] = sum(t["missing"] for c in comparison.values() for t in c.values())
    report["extra"] = sum(t["extra"] for c in comparison.values() for t in c.values())
    return report


def merge_counters(first: dict, second: dict) -> dict:
    """Sandbox counters of two phases added up (faults and totals per vault)."""
    merged = {}
    for app in first:
        faults = Counter(first[app].get("faults", {})) + Counter(second[app].get("faults", {}))
        merged[app] = {"faults": dict(faults), "total": first[app]["total"] + second[app]["total"],
                       "auth": first[app]["auth"] + second[app]["auth"]}
    return merged


def summary_lines(report: dict) -> list[str]:
    f = report["faults"]
    injected = f["faults_injected"]
    client = f["client"]
    return [
        f"records per direction: {report['n']}; fault rate {report['fault_rate']:.0%} (seed {report['fault_seed']}); "
        f"burst limit {report['burst_limit']} calls / {report['burst_window_seconds']} s",
        f"faults injected (sandbox counters): {sum(injected.values())} {dict(sorted(injected.items()))}",
        f"API calls with faults: {f['api_calls']} (+{f['auth_calls']} auth) vs {report['reference']['api_calls']} "
        f"(+{report['reference']['auth_calls']} auth) fault-free",
        f"client retries: {client.get('retry', 0)} call retries, {client.get('race_retry', 0)} record race retries, "
        f"{client.get('reauth', 0)} re-authentications, {client.get('paced', 0)} pacing pauses "
        f"({client.get('pace_seconds', 0)} s), {client.get('delayed_responses', 0)} burst-delayed responses; "
        f"task retries: {f['task_retries']}",
        "DAG runs with faults: " + ", ".join(f"{d}={r['state']}" for d, r in f["dag_runs"].items()),
        f"second window: {f.get('changed')} deleted / updated per direction; "
        f"{'then a fault-free run' if f.get('healing_runs') else 'no fault-free run after'}",
        f"records checked: {report['records_checked']} rows of both vaults compared with the fault-free run; "
        f"missing {report['missing']}, extra/duplicated {report['extra']}",
        f"ledger against the vaults: {f.get('ledger_against_vault')}",
    ]
