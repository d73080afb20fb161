"""API-call floor vs the pipeline: `ctms_to_crm` over a seeded `scale` state, side by side.

    .venv/bin/python bench/floor.py                       # N = 10,000 and 100,000
    .venv/bin/python bench/floor.py --n 1000 --n 10000    # any sizes
    .venv/bin/python bench/floor.py --n 1000000           # see bench/million.py (not CI)
    .venv/bin/python bench/floor.py --n 10000 --latency vault --concurrency 4
    .venv/bin/python bench/floor.py --n 10000 --burst-limit 150 --burst-window-seconds 60

For each N, in one run of this script:

1. Seed. Both vaults with the `scale` scenario, the same --seed-number and --now (CTMS: N
   Clinical Activities on N/20 Persons, N/1000+1 Studies with 2 Sites each; CRM: one Account
   per Person). The seeded SQLite files are kept as pristine copies; every measured phase starts
   from a fresh copy of them, so the floor and the pipeline start from the same state.
2. Floor model. From that state (read over the API once, untimed), the minimum number of API
   calls a correct run needs, and the precomputed calls themselves (see `plan`).
3. Floor run. A minimal script (plain `requests`, one session per vault, payloads serialised in
   advance) makes exactly those calls, timed. Calls are counted by the sandbox
   (/sandbox/counters) and must equal the model.
4. Pipeline run. The `ctms_to_crm__bench` DAG with dag.test() in a fresh Python process over
   the same window (params window_start/window_end), fresh ledger/staging/reports, Airflow
   connections from AIRFLOW_CONN_* env vars, connection file in a temp
   CLINICAL_CRM_CONNECTIONS_DIR. Timed; calls counted by endpoint; peak RSS and CPU time of the
   process that runs the tasks (dag.test runs them in-process).
5. Ratios pipeline/floor (calls, wall time) and a check that CRM holds N interactions after
   both runs.

Parallel floor (`run_parallel_floor`): the same precomputed calls, at most C (--concurrency) in
flight, overlapped as far as their data allows, as the pipeline's concurrency does: auth of both
vaults side by side; reads A = the Clinical Activity query's pages (in order) beside the three
deletions calls; reads B = [study sites, then studies] beside each CRM account statement; then
the writes, target by target (Clinical Studies, Clinical Sites, interactions), by a pool of C
workers pulling the batches. Counted by the sandboxes like the sequential floor (same calls, same
endpoints): the physical limit of the vault at concurrency C. Each floor kind runs
--floor-repeats times per N (default 2; 1 with --latency), the first before the pipeline.

Options for a vault with real network latency: --latency none|vault|FILE and --latency-seed N
(default 1) go to both sandboxes of every measured phase (both floors, the pipeline; the plan's
reads run without latency); --concurrency C (default 4) is the bench connection file's
load.concurrency and the parallel floor's C; --burst-limit L [--burst-window-seconds S, default
300] apply to the pipeline's sandboxes only (the floors keep the huge limit) and go to its Airflow
connections as extras burst_window_seconds = S and burst_floor = max(2, C + 2) (see
Setup.burst_floor), and print a BURST line (calls, wall, bound = calls / L x S, the calls the
sandboxes delayed past the limit). The output ends with one line per N, in order:
`RATIOS N=<n> latency=<profile> concurrency=<C>: calls <x> x floor; wall <y> x parallel floor;
wall <z> x sequential floor; burst-delayed calls <k>` (wall = the pipeline's dag.test() time).
--json FILE also records every printed line.

Features: the bench connection file enables clinical_activities and studies_and_sites (what the
floor models); automated_activities and medical_activities are off (the scale state has no
Monitoring Events / Communication Logs / calls, so they would only add their empty queries).

Auth (and logout) calls are reported separately from the data calls the ratio compares.
Sandboxes get a burst limit of 10,000,000 so nothing is paced or delayed (unless --burst-limit,
for the pipeline). Traffic: 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API = "v25.2"
USER, PASSWORD = "integration@sandbox.example", "sandbox"
# the seeded state's "now": the last full hour, so the run's window is recent like a real one
# (Vault serves deletions of the last 30 days only; the pipeline makes no deletions call beyond)
NOW = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
BURST = 10_000_000
VQL_MAX = 50_000
WRITE_BATCH = 500
DELETIONS_LIMIT = 5000  # deleted ids per deletions call: the API's largest limit, as the client reads
CONNECTION = "bench"
DAG_ID = f"ctms_to_crm__{CONNECTION}"

AUTH_KEYS = ("POST /api/{version}/auth", "DELETE /api/{version}/session")


@dataclass
class Setup:
    """How the vaults behave and how the pipeline is configured for one bench run.

    `latency` (none, vault or the absolute path of a profile file) and `latency_seed` go to both
    sandboxes of every measured phase (both floors and the pipeline; the plan reads without it).
    `concurrency` is the bench connection file's load.concurrency and the parallel floor's C.
    `burst_limit` / `burst_window_seconds` apply to the pipeline's sandboxes only (the floors
    keep the huge BURST) and go to its Airflow connections as extras with `burst_floor`.
    """
    latency: str = "none"
    latency_seed: int = 1
    concurrency: int = 4
    burst_limit: int | None = None
    burst_window_seconds: float | None = None
    latency_label: str | None = None       # as given on the command line (a file's path as typed)

    @property
    def label(self) -> str:
        return self.latency_label or self.latency

    @property
    def window_seconds(self) -> float:
        return 300.0 if self.burst_window_seconds is None else self.burst_window_seconds

    @property
    def burst_floor(self) -> int:
        """Burst calls the pipeline's client keeps in reserve: max(2, C + 2). The client learns
        the remaining calls from a response's X-VaultAPI-BurstLimitRemaining; by then up to C - 1
        other calls of the run may be in flight on that vault and counted after it, and its own
        next call is one more, so a reserve of C keeps every call of the run within the limit.
        The + 2 (at least 2) covers calls that do not go through the run's C slots: the session's
        own calls (e.g. a keep-alive or users/me after a re-auth) and a second client on the same
        vault (another task of the run, the reconciliation)."""
        return max(2, self.concurrency + 2)

    def server_options(self, pipeline: bool = False) -> dict:
        """SandboxServer options: latency always, the burst limit for the pipeline only."""
        options: dict = {"burst_limit": BURST}
        if self.latency != "none":
            options.update(latency=self.latency, latency_seed=self.latency_seed)
        if pipeline and self.burst_limit is not None:
            options.update(burst_limit=self.burst_limit, burst_window_seconds=self.window_seconds)
        return options

    def connection_extras(self) -> dict:
        """Extras of the pipeline's Airflow connections (none unless a burst limit is set)."""
        if self.burst_limit is None:
            return {}
        return {"burst_floor": self.burst_floor, "burst_window_seconds": self.window_seconds}


# ---------------------------------------------------------------- state


def seed(workdir: Path, n: int, seed_number: int, now: str) -> dict:
    """Seed pristine CTMS and CRM files (in parallel, in fresh processes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    procs = {app: subprocess.Popen([sys.executable, "-m", "vault_sandbox", "seed", "--app", app,
                                    "--db", str(workdir / f"{app}.db"), "--scenario", "scale",
                                    "--activities", str(n), "--seed-number", str(seed_number), "--now", now],
                                   stdout=subprocess.PIPE, text=True)
             for app in ("ctms", "crm")}
    out = {}
    for app, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"seeding {app} failed ({proc.returncode})")
        out[app] = json.loads(stdout.strip().splitlines()[-1])
    return out


def fresh_copy(pristine: Path, target: Path) -> Path:
    """A copy of the pristine vault files for one measured phase."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for f in pristine.iterdir():
        if f.name.endswith((".db", ".db-wal", ".db-shm")):
            shutil.copy2(f, target / f.name)
    return target


def servers(folder: Path, **options):
    """The two sandboxes over `folder`'s files; options as SandboxServer's (default: BURST)."""
    from vault_sandbox.testing import SandboxServer

    options = {"burst_limit": BURST, **options}
    return (SandboxServer("ctms", folder / "ctms.db", seed="none", **options),
            SandboxServer("crm", folder / "crm.db", seed="none", **options))


@contextmanager
def latency_off(setup: Setup, sandboxes):
    """No latency inside (the plan's reads); then the setup's profile, its jitter seed restarted
    (the sandboxes then delay the next calls exactly as freshly started ones would)."""
    if setup.latency == "none":
        yield
        return
    for s in sandboxes:
        _admin_ok(s.admin.latency(profile="none"))
    try:
        yield
    finally:
        for s in sandboxes:
            _admin_ok(s.admin.latency(profile=setup.latency, seed=setup.latency_seed))


def _admin_ok(body: dict) -> dict:
    if body.get("responseStatus") != "SUCCESS":
        raise RuntimeError(f"sandbox admin call failed: {body}")
    return body


def bench_config(ctms_conn: str = "vault_ctms_bench", crm_conn: str = "vault_crm_bench", name: str = CONNECTION,
                 concurrency: int | None = None) -> str:
    """The demo connection file as the bench connection (clinical activities + studies/sites only),
    with load.concurrency = `concurrency` when given."""
    import yaml

    cfg = yaml.safe_load((REPO / "include" / "connections" / "demo.yaml").read_text())
    cfg.update(name=name, ctms_conn_id=ctms_conn, crm_conn_id=crm_conn,
               description="Benchmark connection (bench/floor.py)")
    cfg["features"] = {"clinical_activities": True, "studies_and_sites": True,
                       "medical_activities": False, "automated_activities": False}
    if concurrency is not None:
        cfg.setdefault("load", {})["concurrency"] = concurrency
    return yaml.safe_dump(cfg, sort_keys=False)


def window_of(now: str) -> tuple[datetime, datetime]:
    """The scale scenario's hour, opened a minute early (the filter is `> start`)."""
    from vault_sandbox.seed import scale_window

    start, end = scale_window(datetime.fromisoformat(now.replace("Z", "+00:00")))
    return start - timedelta(minutes=1), end


# ---------------------------------------------------------------- the floor


def _pages(rows: int, page_size: int) -> int:
    return max(1, math.ceil(rows / page_size))


def _list_cost(values) -> int:
    from clinical_crm.vault import vql

    return 2 + sum(len(vql.quote(v)) + 1 for v in values)


def plan(cfg, ctms_url: str, crm_url: str, window: tuple[datetime, datetime]) -> dict:
    """The minimum calls of a correct run over this state, with their precomputed payloads.

    Reads (pages at the page size the vault gives; a statement costs max(1, ceil(rows/page))):
    - Clinical Activities changed in the window, with the relationship fields the rules need
      (person identifier and name, creator, study/site global ids, country): one statement.
    - Study Sites: one statement, `changed in the window OR global_id CONTAINS (referenced by
      the activities)`, or a full scan if that is cheaper. Studies: the same, with the studies
      the activities and those sites refer to.
    - CRM Accounts holding the activities' person identifiers: CONTAINS chunks under 50,000
      characters, each a multiple of the page size (so pages = ceil(matches/page) when the
      statements allow), or a full scan if cheaper.
    - Deleted records of the window: ceil(deleted ids / 5000) deletions calls per object, at
      least 1 (activities, studies, sites): 5,000 is the deletions API's largest `limit`.
    Writes (500 records a call, by external id): Clinical Studies, Clinical Sites, interactions.
    """
    import pandas as pd

    from clinical_crm.engine import extract
    from clinical_crm.engine.windows import Window
    from clinical_crm.engine.staging import page_frame
    from clinical_crm.flows import ctms_to_crm
    from clinical_crm.values import text
    from clinical_crm.vault import Query, VaultClient, vql
    from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE

    start, end = window
    win = extract.changed(Window(start, end))
    ops: list[dict] = []
    model: Counter = Counter()

    with VaultClient(ctms_url, USER, PASSWORD) as ctms, VaultClient(crm_url, USER, PASSWORD) as crm:
        page_size = ctms._call("POST", "query", "query", data={"q": "SELECT id FROM user__sys"}).body[
            "responseDetails"]["pagesize"]

        def total(client, obj):
            body = client._call("POST", "query", "query", data={"q": f"SELECT id FROM {obj} PAGESIZE 1"}).body
            return int(body["responseDetails"]["total"])

        def read(client, query):
            frames = [page_frame(p) for p in client.query(query)]
            return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

        # activities
        act_query = ctms_to_crm.clinical_activity_query(cfg).filter(win).ordered(MODIFIED_DATE)
        act_stmt = act_query.statement
        activities = read(ctms, act_query)
        ops.append({"vault": "ctms", "kind": "query", "what": "clinical activities", "q": act_stmt,
                    "calls": _pages(len(activities), page_size)})
        refs = ctms_to_crm.study_reference_columns(cfg)
        ident_col = ctms_to_crm.person_identifier_column(cfg)

        def referenced(what, base, obj, ids):
            """One statement: changed in the window OR referenced (global ids); or a full scan."""
            ids = sorted({i for i in ids if i})
            head = f"{base} WHERE {win} OR {GLOBAL_ID} CONTAINS "
            if ids and len(head) + _list_cost(ids) <= VQL_MAX:
                stmt = head + vql.in_list(ids)
            elif not ids:
                stmt = f"{base} WHERE {win}"
            else:
                stmt = None
            scan = total(ctms, obj)
            frame = read(ctms, stmt) if stmt else None
            if stmt is None or _pages(scan, page_size) < _pages(len(frame), page_size):
                changed = set(read(ctms, f"{base} WHERE {win}")[GLOBAL_ID]) if stmt is None else set(
                    frame[GLOBAL_ID])
                stmt = base
                frame = read(ctms, base)
                frame = frame[frame[GLOBAL_ID].isin(set(ids) | changed)]
                calls = _pages(scan, page_size)
            else:
                calls = _pages(len(frame), page_size)
            ops.append({"vault": "ctms", "kind": "query", "what": what, "q": stmt, "calls": calls})
            return frame

        sites = referenced("study sites", ctms_to_crm.site_query(cfg).statement, cfg.ctms.site.object,
                           set(activities[refs["site"]].map(text)))
        site_study = ctms_to_crm.site_study_column(cfg)
        studies = referenced("studies", ctms_to_crm.study_query(cfg).statement, cfg.ctms.study.object,
                             set(activities[refs["study"]].map(text)) | set(sites[site_study].map(text)))

        for obj in (cfg.ctms.activity.object, cfg.ctms.study.object, cfg.ctms.site.object):
            n_deleted = sum(len(p) for p in ctms.deletions(obj, start, end))
            ops.append({"vault": "ctms", "kind": "deletions", "what": f"deletions of {obj}", "object": obj,
                        "params": {"start_date": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                   "end_date": end.strftime("%Y-%m-%dT%H:%M:%SZ"), "limit": DELETIONS_LIMIT},
                        "calls": _pages(n_deleted, DELETIONS_LIMIT)})
            if n_deleted:
                raise SystemExit("the floor model assumes a state without deletions (the scale scenario has none)")

        # accounts
        field = cfg.identifiers.crm_account_field
        acc_base = Query.select(cfg.crm.account.object, [ID, field]).statement
        identifiers = sorted({v for v in activities[ident_col].map(text) if v})
        head_len = len(f"{acc_base} WHERE {field} CONTAINS ")
        account_frames, acc_ops = [], []
        # the product's own chunking, with the whole VQL limit as room (no safety margin)
        for chunk in vql.page_aligned_chunks(identifiers, VQL_MAX - head_len, page_size):
            stmt = f"{acc_base} WHERE {field} CONTAINS {vql.in_list(chunk)}"
            frame = read(crm, stmt)
            account_frames.append(frame)
            acc_ops.append({"vault": "crm", "kind": "query", "what": "accounts by identifier", "q": stmt,
                            "calls": _pages(len(frame), page_size)})
        scan = total(crm, cfg.crm.account.object)
        if acc_ops and sum(o["calls"] for o in acc_ops) > _pages(scan, page_size):
            acc_ops = [{"vault": "crm", "kind": "query", "what": "accounts (full scan)", "q": acc_base,
                        "calls": _pages(scan, page_size)}]
        ops += acc_ops
        accounts = pd.concat(account_frames, ignore_index=True) if account_frames else pd.DataFrame(columns=[ID, field])

    # payloads, exactly as the pipeline's rules build them (precomputed: not timed)
    unique = accounts.drop_duplicates(field, keep=False).set_index(field)[ID]
    activities["account_id"] = activities[ident_col].map(text).map(unique)
    valid = activities[activities["account_id"].notna()]
    from clinical_crm.vault.client import _json_ready  # the client's JSON conversion (dates, NaN -> null)

    def writes(what, obj, id_param, records):
        records = [_json_ready({k: v for k, v in r.items() if not k.startswith("_") and not ("." in k and v is None)})
                   for r in records]
        for i in range(0, len(records), WRITE_BATCH):
            ops.append({"vault": "crm", "kind": "write", "what": what, "object": obj, "id_param": id_param,
                        "body": json.dumps(records[i:i + WRITE_BATCH]).encode(), "calls": 1,
                        "records": len(records[i:i + WRITE_BATCH])})

    c = cfg.crm
    writes("clinical studies", c.clinical_study.object, c.clinical_study.fields.external_id,
           ctms_to_crm.clinical_studies(studies, cfg))
    writes("clinical sites", c.clinical_site.object, c.clinical_site.fields.external_id,
           ctms_to_crm.clinical_sites(sites, cfg))
    writes("clinical interactions", c.interaction.object, c.interaction.fields.external_id,
           ctms_to_crm.clinical_interactions(valid, cfg))
    for o in ops:
        model[f"{o['vault']} {o['what']}"] += o["calls"]
    return {"ops": ops, "model": dict(model), "calls": sum(model.values()), "page_size": page_size,
            "rows": {"activities": len(activities), "valid": len(valid), "studies": len(studies),
                     "sites": len(sites), "identifiers": len(identifiers), "accounts": len(accounts)},
            "auth": 2}


def run_op(op: dict, call) -> int:
    """One planned statement or write: its first call, then its next pages one after the other.
    `call(vault, method, path, **requests_kwargs)` makes one HTTP call and returns the JSON body.
    Returns the number of calls made."""
    vault = op["vault"]
    if op["kind"] == "query":
        body = call(vault, "POST", f"/api/{API}/query", data={"q": op["q"]})
    elif op["kind"] == "deletions":
        body = call(vault, "GET", f"/api/{API}/objects/deletions/vobjects/{op['object']}", params=op["params"])
    else:
        body = call(vault, "POST", f"/api/{API}/vobjects/{op['object']}", params={"idParam": op["id_param"]},
                    data=op["body"], headers={"Content-Type": "application/json"})
    calls = 1
    assert body["responseStatus"] == "SUCCESS", body
    if op["kind"] == "write":
        bad = [r for r in body["data"] if r["responseStatus"] != "SUCCESS"]
        assert not bad, bad[:3]
    while (body.get("responseDetails") or {}).get("next_page"):
        body = call(vault, "GET", body["responseDetails"]["next_page"])
        assert body["responseStatus"] == "SUCCESS", body
        calls += 1
    return calls


def run_floor(ops: list[dict], urls: dict[str, str]) -> dict:
    """Make exactly the planned calls (sequentially, one session per vault); returns timings."""
    import requests

    started = time.perf_counter()
    http = {}
    for vault, url in urls.items():
        s = requests.Session()
        body = s.post(f"{url}/api/{API}/auth", data={"username": USER, "password": PASSWORD}).json()
        s.headers["Authorization"] = body["sessionId"]
        http[vault] = s

    def call(vault, method, path, **kw):
        return http[vault].request(method, urls[vault] + path, **kw).json()

    calls = 0
    by_kind: Counter = Counter()
    for op in ops:
        op_started = time.perf_counter()
        calls += run_op(op, call)
        by_kind["reads" if op["kind"] != "write" else "writes"] += time.perf_counter() - op_started
    seconds = time.perf_counter() - started
    for s in http.values():
        s.close()
    return {"seconds": seconds, "client_calls": calls, "seconds_by_kind": {k: round(v, 2) for k, v in by_kind.items()}}


def parallel_phases(ops: list[dict]) -> dict:
    """The planned calls in the order their data lets them run (what the pipeline's concurrency may
    overlap): chains run one call after the other, the chains of a phase side by side.

    - reads A: [Clinical Activity pages], [deletions of activities], [of studies], [of sites]
    - reads B: [study sites, then studies] (the sites' studies are in the studies statement), and
      each CRM account statement on its own (they need the activities' identifiers: after A)
    - writes: one list of batches per target, in order (Clinical Studies, Clinical Sites, interactions)
    """
    a = [[o for o in ops if o["kind"] == "query" and o["vault"] == "ctms" and o["what"] == "clinical activities"]]
    a += [[o] for o in ops if o["kind"] == "deletions"]
    b = [[o for o in ops if o["kind"] == "query" and o["vault"] == "ctms" and o["what"] != "clinical activities"]]
    b += [[o] for o in ops if o["kind"] == "query" and o["vault"] == "crm"]
    targets: dict[str, list[dict]] = {}
    for o in ops:
        if o["kind"] == "write":
            targets.setdefault(o["what"], []).append(o)
    phases = {"reads_a": [c for c in a if c], "reads_b": [c for c in b if c], "writes": list(targets.values())}
    placed = sum(len(c) for chains in phases.values() for c in chains)
    if placed != len(ops):
        raise ValueError(f"parallel floor: {placed} of {len(ops)} planned operations placed in a phase")
    return phases


def run_parallel_floor(ops: list[dict], urls: dict[str, str], concurrency: int) -> dict:
    """The same calls as `run_floor`, at most `concurrency` in flight, overlapped as their data
    allows (`parallel_phases`): auth of both vaults side by side; reads A; reads B; then the writes,
    target by target, by a pool of `concurrency` workers pulling the batches. Each phase starts
    when the one before has ended. Sessions (one per call in flight) are reused between phases."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    import requests

    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    slots = threading.BoundedSemaphore(concurrency)
    idle = {vault: queue.SimpleQueue() for vault in urls}      # keep-alive sessions not in use
    tokens: dict[str, str] = {}
    lock = threading.Lock()
    flight = {"now": 0, "peak": 0}

    def call(vault, method, path, headers=None, **kw):
        with slots:
            with lock:
                flight["now"] += 1
                flight["peak"] = max(flight["peak"], flight["now"])
            try:
                try:
                    s = idle[vault].get_nowait()
                except queue.Empty:
                    s = requests.Session()
                try:
                    if vault in tokens:
                        headers = {"Authorization": tokens[vault], **(headers or {})}
                    return s.request(method, urls[vault] + path, headers=headers, **kw).json()
                finally:
                    idle[vault].put(s)
            finally:
                with lock:
                    flight["now"] -= 1

    def auth(vault):
        body = call(vault, "POST", f"/api/{API}/auth", data={"username": USER, "password": PASSWORD})
        assert body["responseStatus"] == "SUCCESS", body
        tokens[vault] = body["sessionId"]

    def chain(ops_):
        return sum(run_op(op, call) for op in ops_)

    phases = parallel_phases(ops)
    seconds: dict[str, float] = {}
    calls = 0
    started = time.perf_counter()
    chains = max(len(urls), *(len(phases[p]) for p in ("reads_a", "reads_b")))
    with ThreadPoolExecutor(max_workers=chains) as readers, ThreadPoolExecutor(max_workers=concurrency) as writers:
        t = time.perf_counter()
        for f in [readers.submit(auth, v) for v in urls]:
            f.result()
        seconds["auth"] = time.perf_counter() - t
        for name in ("reads_a", "reads_b"):
            t = time.perf_counter()     # a thread per chain; the slots keep at most C calls in flight
            calls += sum(f.result() for f in [readers.submit(chain, c) for c in phases[name]])
            seconds[name] = time.perf_counter() - t
        t = time.perf_counter()
        for batches in phases["writes"]:    # C workers pulling this target's batches, in order
            calls += sum(f.result() for f in [writers.submit(run_op, op, call) for op in batches])
        seconds["writes"] = time.perf_counter() - t
    total = time.perf_counter() - started
    for q in idle.values():
        while not q.empty():
            q.get_nowait().close()
    return {"seconds": total, "client_calls": calls, "concurrency": concurrency, "peak_in_flight": flight["peak"],
            "seconds_by_phase": {k: round(v, 2) for k, v in seconds.items()}}


# ---------------------------------------------------------------- the pipeline (child process)


def _conn(url: str, extra: dict | None = None) -> str:
    conn = {"conn_type": "veeva_vault", "host": url, "login": USER, "password": PASSWORD}
    if extra:
        conn["extra"] = extra
    return json.dumps(conn)


def airflow_env(airflow_home: Path, data_dir: Path, connections: Path) -> dict:
    return {
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        "CLINICAL_CRM_DATA_DIR": str(data_dir),
        "CLINICAL_CRM_CONNECTIONS_DIR": str(connections),
        "GX_ANALYTICS_ENABLED": "False",
    }


def migrate(airflow_home: Path, env: dict) -> None:
    airflow_home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                   env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)


def run_pipeline(env: dict, window: tuple[datetime, datetime], out: Path, profile: str | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_dag", "--out", str(out),
           "--window-start", window[0].isoformat(), "--window-end", window[1].isoformat()]
    if profile:
        cmd += ["--profile", profile]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.stderr.write(proc.stdout[-5000:])
        raise RuntimeError(f"pipeline process exited with {proc.returncode}")
    result = json.loads(out.read_text())
    result["process_seconds"] = wall
    return result


def _vm_hwm_mib() -> float:
    """Peak RSS of this process image (Linux /proc VmHWM; resets at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def dag_main(args) -> int:
    """In the fresh process: build the DAG, dag.test() it, write timings and rusage as JSON."""
    import resource

    process_start = time.perf_counter()
    from clinical_crm.airflow.dag_factory import build_dags

    dag = build_dags()[DAG_ID]
    conf = {"window_start": args.window_start, "window_end": args.window_end}

    # Time spent inside the runner's own step functions (the rest of dag.test() is Airflow's
    # task orchestration): the tasks call clinical_crm.engine.runner.<step> at run time, in-process.
    from clinical_crm.engine import runner

    steps: dict[str, float] = {}
    maxrss_after: dict[str, int] = {}  # ru_maxrss (monotonic) at the end of each step: which step set the peak

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                steps[name] = steps.get(name, 0.0) + time.perf_counter() - t
                maxrss_after[name] = round(_vm_hwm_mib())
        return wrapper

    for name in ("begin", "pre_step", "extract", "validate", "transform", "load", "finish"):
        setattr(runner, name, timed(name, getattr(runner, name)))

    # RSS sampled every 50 ms: the peak of each step (ru_maxrss gives the peak of the process).
    import threading

    import psutil

    me, samples, stop = psutil.Process(), [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((time.time(), me.memory_info().rss))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    dr = dag.test(run_conf=conf, logical_date=datetime.now(timezone.utc))
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)  # read with: python -m pstats FILE (sort cumtime / tottime)
    stop.set()
    sampler.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    tasks, task_rss = {}, {}
    for ti in dr.get_task_instances():
        if ti.start_date and ti.end_date:
            tasks[ti.task_id] = round((ti.end_date - ti.start_date).total_seconds(), 2)
            t0, t1 = ti.start_date.timestamp(), ti.end_date.timestamp()
            inside = [rss for t, rss in samples if t0 <= t <= t1]
            task_rss[ti.task_id] = round(max(inside) / 2**20) if inside else None
    Path(args.out).write_text(json.dumps({
        "state": str(dr.state), "dag_test_seconds": seconds,
        "import_and_parse_seconds": started - process_start,
        "cpu_user": cpu1.ru_utime - cpu0.ru_utime, "cpu_system": cpu1.ru_stime - cpu0.ru_stime,
        "cpu_total_process": cpu1.ru_utime + cpu1.ru_stime,
        # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec, so it started from this bench
        # process's parent (which holds the floor's precomputed payloads: ~4 GB at 1M)
        "max_rss_mib": _vm_hwm_mib(), "ru_maxrss_mib": cpu1.ru_maxrss / 1024,
        "children_max_rss_mib": children.ru_maxrss / 1024,
        "tasks": tasks, "task_peak_rss_mib": task_rss, "maxrss_after_step_mib": maxrss_after,
        "sampled_peak_rss_mib": round(max((r for _, r in samples), default=0) / 2**20),
        "steps": {k: round(v, 2) for k, v in steps.items()},
        "steps_seconds": sum(steps.values())}))
    return 0


# ---------------------------------------------------------------- one N


def count_interactions(crm_url: str, cfg) -> int:
    from clinical_crm.vault.client import VaultClient

    with VaultClient(crm_url, USER, PASSWORD) as crm:
        body = crm._call("POST", "query", "query",
                         data={"q": f"SELECT id FROM {cfg.crm.interaction.object} PAGESIZE 1"}).body
        return int(body["responseDetails"]["total"])


def split_counters(counters: dict) -> tuple[int, int, dict]:
    endpoints = dict(counters["endpoints"])
    logout = endpoints.pop(AUTH_KEYS[1], 0)
    return sum(endpoints.values()), counters["auth"] + logout, endpoints


def measure(n: int, workdir: Path, seed_number: int, now: str, airflow_home: Path,
            skip_pipeline: bool = False, profile: str | None = None, floor_repeats: int = 2,
            pipeline_only: bool = False, setup: Setup | None = None) -> dict:
    from clinical_crm.config import parse_connection
    import yaml

    setup = setup or Setup()
    t = time.perf_counter()
    seeded = seed(workdir / "pristine", n, seed_number, now)
    seed_seconds = time.perf_counter() - t
    window = window_of(now)
    cfg = parse_connection(yaml.safe_load(bench_config(concurrency=setup.concurrency)), "bench.yaml")
    result = {"n": n, "seed_seconds": seed_seconds, "seeded": {k: v["counts"] for k, v in seeded.items()},
              "window": [window[0].isoformat(), window[1].isoformat()], "setup": asdict(setup)}

    if pipeline_only:
        return _pipeline_only(result, workdir, airflow_home, window, cfg, profile, setup)
    # floor: plan (untimed, without latency), reset counters, run (timed)
    ctms_s, crm_s = servers(fresh_copy(workdir / "pristine", workdir / "floor"), **setup.server_options())
    with ctms_s, crm_s:
        with latency_off(setup, (ctms_s, crm_s)):
            p = plan(cfg, ctms_s.url, crm_s.url, window)
        for s in (ctms_s, crm_s):
            s.admin.reset_counters()
        floor = run_floor(p["ops"], {"ctms": ctms_s.url, "crm": crm_s.url})
        counters = {"ctms": ctms_s.admin.counters(), "crm": crm_s.admin.counters()}
        floor["interactions_after"] = count_interactions(crm_s.url, cfg)
    floor_calls = sum(split_counters(c)[0] for c in counters.values())
    floor.update(model=p["model"], model_calls=p["calls"], rows=p["rows"], page_size=p["page_size"],
                 server_calls=floor_calls, auth=sum(split_counters(c)[1] for c in counters.values()),
                 endpoints={k: split_counters(c)[2] for k, c in counters.items()})
    if floor_calls != p["calls"]:
        raise SystemExit(f"floor script made {floor_calls} calls, the model says {p['calls']}")
    result["floor"] = floor

    def floor_again(parallel: bool) -> dict:
        """The same precomputed calls on a fresh copy, sequential or parallel (C = concurrency)."""
        a, b = servers(fresh_copy(workdir / "pristine", workdir / "floor"), **setup.server_options())
        with a, b:
            for srv in (a, b):
                srv.admin.reset_counters()
            urls = {"ctms": a.url, "crm": b.url}
            again = run_parallel_floor(p["ops"], urls, setup.concurrency) if parallel else run_floor(p["ops"], urls)
            counted = {"ctms": a.admin.counters(), "crm": b.admin.counters()}
            if parallel:
                again["interactions_after"] = count_interactions(b.url, cfg)
        calls = sum(split_counters(c)[0] for c in counted.values())
        kind = "parallel floor" if parallel else "floor script"
        if calls != p["calls"]:
            raise SystemExit(f"{kind} made {calls} calls, the model says {p['calls']}")
        again.update(server_calls=calls, auth=sum(split_counters(c)[1] for c in counted.values()),
                     endpoints={k: split_counters(c)[2] for k, c in counted.items()})
        if again["endpoints"] != floor["endpoints"]:
            raise SystemExit(f"{kind} made other calls than the first floor run: {again['endpoints']} "
                             f"against {floor['endpoints']}")
        return again

    # floors timed before and after the pipeline (the first of each kind before); ratios use means
    par = result["parallel_floor"] = floor_again(parallel=True)
    repeats = max(1, floor_repeats) - 1
    if not skip_pipeline:
        pipe = result["pipeline"] = pipeline_phase(workdir, airflow_home, window, cfg, profile, setup)
    floor["seconds_runs"] = [floor["seconds"]] + [floor_again(False)["seconds"] for _ in range(repeats)]
    par["seconds_runs"] = [par["seconds"]] + [floor_again(True)["seconds"] for _ in range(repeats)]
    for f in (floor, par):
        f["seconds"] = sum(f["seconds_runs"]) / len(f["seconds_runs"])
    if not skip_pipeline:
        result["ratio_calls"] = pipe["server_calls"] / floor_calls
        result["ratio_time_dag_test"] = pipe["dag_test_seconds"] / floor["seconds"]
        result["ratio_time_process"] = pipe["process_seconds"] / floor["seconds"]
        result["ratio_time_parallel"] = pipe["dag_test_seconds"] / par["seconds"]
        if setup.burst_limit is not None:
            bound = pipe["server_calls"] / setup.burst_limit * setup.window_seconds
            result["burst"] = {"limit": setup.burst_limit, "window_seconds": setup.window_seconds,
                               "burst_floor": setup.burst_floor, "calls": pipe["server_calls"],
                               "wall_seconds": pipe["dag_test_seconds"], "bound_seconds": bound,
                               "wall_over_bound": pipe["dag_test_seconds"] / bound if bound else None,
                               "delayed": pipe["delayed"]}
    shutil.rmtree(workdir / "floor", ignore_errors=True)
    return result


def pipeline_phase(workdir, airflow_home, window, cfg, profile, setup: Setup | None = None) -> dict:
    """The DAG over a fresh copy of the seeded state, with the sandboxes' call counters."""
    setup = setup or Setup()
    phase = fresh_copy(workdir / "pristine", workdir / "pipeline")
    connections = phase / "connections"
    connections.mkdir()
    (connections / "bench.yaml").write_text(bench_config(concurrency=setup.concurrency))
    env = airflow_env(airflow_home, phase / "data", connections)
    ctms_s, crm_s = servers(phase, **setup.server_options(pipeline=True))
    with ctms_s, crm_s:
        env["AIRFLOW_CONN_VAULT_CTMS_BENCH"] = _conn(ctms_s.url, setup.connection_extras())
        env["AIRFLOW_CONN_VAULT_CRM_BENCH"] = _conn(crm_s.url, setup.connection_extras())
        for s in (ctms_s, crm_s):
            s.admin.reset_counters()
        pipe = run_pipeline(env, window, phase / "pipeline.json", profile)
        counters = {"ctms": ctms_s.admin.counters(), "crm": crm_s.admin.counters()}
        pipe["interactions_after"] = count_interactions(crm_s.url, cfg)
    pipe["server_calls"] = sum(split_counters(c)[0] for c in counters.values())
    pipe["auth"] = sum(split_counters(c)[1] for c in counters.values())
    pipe["endpoints"] = {k: split_counters(c)[2] for k, c in counters.items()}
    # calls the sandboxes delayed past the burst limit (sum over both vaults)
    pipe["delayed_by_vault"] = {k: c.get("delayed", 0) for k, c in counters.items()}
    pipe["delayed"] = sum(pipe["delayed_by_vault"].values())
    return pipe


def _pipeline_only(result, workdir, airflow_home, window, cfg, profile, setup: Setup | None = None) -> dict:
    """--pipeline-only: the DAG run alone (no floor; for memory diagnosis at large N)."""
    result["pipeline"] = pipeline_phase(workdir, airflow_home, window, cfg, profile, setup)
    print(json.dumps(result, indent=1, default=str), flush=True)
    return result


def report(r: dict) -> str:
    f = r["floor"]
    lines = [f"== N = {r['n']:,} (seed {r['seed_seconds']:.1f} s; window {r['window'][0]} .. {r['window'][1]})",
             f"rows: {f['rows']}; page size {f['page_size']}",
             setup_line(r["setup"]),
             "floor model (data calls):"]
    lines += [f"  {k:<40} {v:>6}" for k, v in f["model"].items()]
    lines.append(f"  {'total':<40} {f['model_calls']:>6}   (+{f['auth']} auth)")
    def runs(x):
        if "seconds_runs" not in x:
            return ""
        when = "" if "pipeline" not in r else ", before/after the pipeline" if len(x["seconds_runs"]) > 1 \
            else ", before the pipeline"
        return " (runs: " + ", ".join(f"{v:.2f}" for v in x["seconds_runs"]) + f" s{when})"

    lines.append(f"floor run: {f['server_calls']} calls counted by the sandboxes, {f['seconds']:.2f} s{runs(f)} "
                 f"(first run: {f['seconds_by_kind']}); "
                 f"CRM interactions after: {f['interactions_after']:,}")
    if "parallel_floor" in r:
        pf = r["parallel_floor"]
        lines.append(f"parallel floor (C={pf['concurrency']}; peak {pf['peak_in_flight']} calls in flight): "
                     f"{pf['server_calls']} calls counted by the sandboxes, {pf['seconds']:.2f} s{runs(pf)} "
                     f"(first run: {pf['seconds_by_phase']}); CRM interactions after: {pf['interactions_after']:,}")
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(f"pipeline ({DAG_ID}, dag.test() in a fresh process): state {p['state']}")
        for vault, eps in p["endpoints"].items():
            for k, v in eps.items():
                lines.append(f"  {vault} {k:<60} {v:>6}")
        lines.append(f"  total {p['server_calls']} data calls (+{p['auth']} auth/logout); "
                     f"CRM interactions after: {p['interactions_after']:,}")
        lines.append(f"  dag.test(): {p['dag_test_seconds']:.2f} s; whole process (imports, parse, run): "
                     f"{p['process_seconds']:.2f} s; tasks {p['tasks']}")
        lines.append(f"  pipeline step functions: {p['steps_seconds']:.2f} s {p['steps']}; "
                     "Airflow task orchestration (dag.test() minus steps): "
                     f"{p['dag_test_seconds'] - p['steps_seconds']:.2f} s")
        lines.append(f"  peak RSS by task (MiB, sampled every 50 ms): {p['task_peak_rss_mib']}; process peak "
                     f"(VmHWM) after each step: {p.get('maxrss_after_step_mib')}")
        lines.append(f"  CPU (run) {p['cpu_user'] + p['cpu_system']:.1f} s (user {p['cpu_user']:.1f}, "
                     f"sys {p['cpu_system']:.1f}); peak RSS (VmHWM) {p['max_rss_mib']:.0f} MiB "
                     f"(children {p['children_max_rss_mib']:.0f} MiB)")
        lines.append(f"  calls delayed past the burst limit: {p.get('delayed', 0)} {p.get('delayed_by_vault', {})}")
        lines.append(f"ratios N={r['n']:,}: calls {r['ratio_calls']:.3f} x floor; wall time "
                     f"{r['ratio_time_dag_test']:.2f} x floor (dag.test), {r['ratio_time_process']:.2f} x "
                     f"(whole process); {r['ratio_time_parallel']:.2f} x parallel floor (dag.test)")
    return "\n".join(lines)


def setup_line(setup: dict) -> str:
    latency = setup.get("latency_label") or setup["latency"]
    seed = f" (jitter seed {setup['latency_seed']})" if latency != "none" else ""
    if setup.get("burst_limit") is None:
        burst = "none (floors and pipeline: 10,000,000)"
    else:
        window = setup["burst_window_seconds"] if setup["burst_window_seconds"] is not None else 300.0
        burst = (f"{setup['burst_limit']} calls / {window:g} s for the pipeline (floors: 10,000,000); its "
                 f"connections' burst_floor {max(2, setup['concurrency'] + 2)}, burst_window_seconds {window:g}")
    return f"setup: latency {latency}{seed}; concurrency {setup['concurrency']}; burst limit {burst}"


def summary(results: list[dict]) -> list[str]:
    """The closing lines: a BURST line per N (with a burst limit), then a RATIOS line per N."""
    burst, ratios = [], []
    for r in results:
        if "pipeline" not in r:
            continue
        s, p = r["setup"], r["pipeline"]
        if "burst" in r:
            b = r["burst"]
            ratio = f"{b['wall_over_bound']:.2f}" if b["wall_over_bound"] is not None else "n/a"
            burst.append(f"BURST N={r['n']} limit={b['limit']}/{b['window_seconds']:g}s: calls {b['calls']}; "
                         f"wall {b['wall_seconds']:.2f} s; bound calls/limit*window {b['bound_seconds']:.2f} s; "
                         f"wall/bound {ratio}; burst-delayed calls {b['delayed']}")
        ratios.append(f"RATIOS N={r['n']} latency={s.get('latency_label') or s['latency']} "
                      f"concurrency={s['concurrency']}: calls {r['ratio_calls']:.3f} x floor; "
                      f"wall {r['ratio_time_parallel']:.2f} x parallel floor; "
                      f"wall {r['ratio_time_dag_test']:.2f} x sequential floor; burst-delayed calls {p['delayed']}")
    return burst + ratios


def scaling(results: list[dict]) -> str:
    """Time at each N against the smallest N measured (target: 1M within 11 x 100k)."""
    lines = []
    for a, b in zip(results, results[1:]):
        f = b["floor"]["seconds"] / a["floor"]["seconds"]
        line = f"SCALING N={a['n']:,} -> {b['n']:,} ({b['n'] / a['n']:.0f} x rows): floor time x {f:.2f}"
        if "parallel_floor" in a and "parallel_floor" in b:
            line += f", parallel floor x {b['parallel_floor']['seconds'] / a['parallel_floor']['seconds']:.2f}"
        if "pipeline" in a and "pipeline" in b:
            pa_, pb = a["pipeline"], b["pipeline"]
            line += (f"; pipeline dag.test() x {pb['dag_test_seconds'] / pa_['dag_test_seconds']:.2f}, "
                     f"whole process x {pb['process_seconds'] / pa_['process_seconds']:.2f}; peak RSS "
                     f"{pa_['max_rss_mib']:.0f} -> {pb['max_rss_mib']:.0f} MiB")
        lines.append(line)
    return "\n".join(lines)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (f"date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; nproc {os.cpu_count()}; memory {mem:.0f} GiB; "
            f"python {platform.python_version()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    dag = sub.add_parser("_dag", help="internal: run the DAG in this (fresh) process")
    dag.add_argument("--out", required=True)
    dag.add_argument("--window-start", required=True)
    dag.add_argument("--window-end", required=True)
    dag.add_argument("--profile")
    parser.add_argument("--n", type=int, action="append",
                        help="Clinical Activities (repeatable; default 10000 and 100000)")
    parser.add_argument("--seed-number", type=int, default=1)
    parser.add_argument("--now", default=NOW)
    parser.add_argument("--workdir", help="keep the files here (default: a temp dir, removed)")
    parser.add_argument("--floor-only", action="store_true", help="skip the pipeline run")
    parser.add_argument("--pipeline-only", action="store_true", help="skip the floor (memory diagnosis)")
    parser.add_argument("--profile", help="write a cProfile profile of the DAG run to this file (+ .N)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    parser.add_argument("--floor-repeats", type=int, default=None,
                        help="runs of each floor kind per N (first before, the others after the pipeline; mean "
                             "used); default 2, or 1 with --latency (a sequential floor then takes minutes)")
    parser.add_argument("--latency", default="none", metavar="PROFILE",
                        help="latency of both sandboxes in every measured phase: none (default), vault or a "
                             "YAML/JSON profile file (docs/sandbox.md); the plan reads without it")
    parser.add_argument("--latency-seed", type=int, default=1, help="seed of the latency jitter (default 1)")
    parser.add_argument("--concurrency", type=int, default=4,
                        help="the bench connection's load.concurrency and the parallel floor's calls in flight "
                             "(1..16, default 4)")
    parser.add_argument("--burst-limit", type=int,
                        help="burst limit of both sandboxes for the pipeline run only (floors: 10,000,000); "
                             "also prints a BURST line")
    parser.add_argument("--burst-window-seconds", type=float,
                        help="with --burst-limit: the burst window (default 300, Vault's 5 minutes)")
    args = parser.parse_args(argv)
    if args.command == "_dag":
        return dag_main(args)
    setup = setup_from_args(parser, args)
    floor_repeats = args.floor_repeats if args.floor_repeats is not None else (1 if setup.latency != "none" else 2)

    sizes = args.n or [10_000, 100_000]
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_floor_"))
    results, printed = [], []

    def say(text: str) -> None:
        print(text, flush=True)
        printed.extend(text.splitlines())

    try:
        say(machine())
        airflow_home = tmp / "airflow_home"
        if not args.floor_only:
            migrate(airflow_home, airflow_env(airflow_home, tmp / "data", tmp / "connections"))
        for n in sizes:
            r = measure(n, tmp / f"n{n}", args.seed_number, args.now, airflow_home, args.floor_only,
                        f"{args.profile}.{n}" if args.profile else None, floor_repeats, args.pipeline_only,
                        setup)
            results.append(r)
            if args.pipeline_only:
                continue
            say(report(r))
        closing = []
        if not args.pipeline_only:
            if len(results) > 1:
                say(scaling(results))
            closing = summary(results)
            for line in closing:      # the RATIOS lines last, one per N, in order
                say(line)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "machine": machine(), "setup": asdict(setup), "floor_repeats": floor_repeats,
                "results": results, "summary": closing, "output": printed}, indent=2, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def setup_from_args(parser: argparse.ArgumentParser, args) -> Setup:
    """The Setup of the command line, checked (a bad profile file or value stops before seeding)."""
    from clinical_crm.config import MAX_CONCURRENCY
    from vault_sandbox.control import latency_profile

    latency = args.latency
    if latency not in ("none", "vault"):
        latency = str(Path(latency).resolve())     # the sandboxes may run elsewhere than this cwd
    try:
        latency_profile(latency)
    except ValueError as exc:
        parser.error(f"--latency: {exc}")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        parser.error(f"--concurrency must be between 1 and {MAX_CONCURRENCY}")
    if args.burst_limit is not None and args.burst_limit < 1:
        parser.error("--burst-limit must be at least 1")
    if args.burst_window_seconds is not None:
        if args.burst_limit is None:
            parser.error("--burst-window-seconds needs --burst-limit")
        if args.burst_window_seconds <= 0:
            parser.error("--burst-window-seconds must be above 0")
    if args.floor_repeats is not None and args.floor_repeats < 1:
        parser.error("--floor-repeats must be at least 1")
    return Setup(latency=latency, latency_seed=args.latency_seed, concurrency=args.concurrency,
                 burst_limit=args.burst_limit, burst_window_seconds=args.burst_window_seconds,
                 latency_label=args.latency)


if __name__ == "__main__":
    sys.exit(main())
