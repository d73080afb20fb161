"""Overlap: a scheduled-style run (logical date of the last full hour, window by the rule) and a
backfill-style run (an earlier logical date, explicit window over the same hours) of
ctms_to_crm__demo run at the same time in two processes, while some source records change.
No record is duplicated; after the next scheduled run every changed record carries its newest
values in CRM, and CRM holds exactly what the source says.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.usefixtures("airflow_db")
HERE = Path(__file__).parent
N, BATCH, CHANGED = 1000, 50, 40


def interactions(folder: Path) -> dict[str, list[str]]:
    with sqlite3.connect(f"file:{folder / 'crm.db'}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT external_id__v, subject__v FROM clinical_interaction__v").fetchall()
    found: dict[str, list[str]] = {}
    for external, subject in rows:
        found.setdefault(external, []).append(subject)
    return found


def test_scheduled_and_backfill_at_once(tmp_path):
    from clinical_crm.vault.client import VaultClient

    seed = harness.seed_world(tmp_path / "seed", N)
    folder = harness.copy_world(seed, tmp_path / "w")
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    with harness.World(folder, batch_size=BATCH) as world:
        env = {**os.environ, **world.env}
        ctms = VaultClient(world.ctms.url, harness.USER, harness.PASSWORD)
        activities = [r for p in ctms.query("SELECT id, global_id__sys FROM crm_activity__v "
                                             "ORDER BY id ASC") for r in p.records]
        commands = {
            "scheduled": [hour - timedelta(hours=1)],
            "backfill": [hour - timedelta(hours=3), hour - timedelta(hours=3), hour + timedelta(minutes=5)],
        }
        procs = {}
        for name, args in commands.items():
            log = open(tmp_path / f"{name}.log", "wb")
            # each dag.test() process on its own copy of the (migrated) Airflow metadata DB: two
            # dag.test() calls race to insert the DAG rows; the ledger and the vaults are shared
            home = tmp_path / f"airflow_{name}"
            home.mkdir()
            shutil.copy(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", home / "airflow.db")
            own = {**env, "AIRFLOW_HOME": str(home),
                   "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
            procs[name] = subprocess.Popen([sys.executable, str(HERE / "run_dag.py"), "ctms_to_crm__demo",
                                            *[a.isoformat() for a in args]],
                                           env=own, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if name == "scheduled":  # dag.test() writes the DAG to the metadata DB first: not both at once
                deadline = time.monotonic() + 120
                while world.ctms.admin.counters()["total"] < 1:
                    assert time.monotonic() < deadline and procs[name].poll() is None, \
                        (tmp_path / f"{name}.log").read_text()[-2000:]
                    time.sleep(0.05)
        # change records while they run: once the first interactions are being written, or as soon
        # as one run has ended (the one-hour window can finish before the backfill writes; whether
        # it succeeded is checked below, and the newest value must win either way)
        deadline = time.monotonic() + 300
        writes = "POST /api/{version}/vobjects/clinical_interaction__v"
        while (world.crm.admin.counters()["endpoints"].get(writes, 0) < 2
               and all(p.poll() is None for p in procs.values())):
            assert time.monotonic() < deadline, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in procs}
            time.sleep(0.05)
        changed = activities[:CHANGED]
        for round_ in range(3):  # several changes while they run: the last one must win
            out = ctms.update("crm_activity__v", [{"id": a["id"], "subject__v": f"changed {round_} {a['id']}"}
                                                  for a in changed])
            assert all(o.outcome == "updated" for o in out)
            time.sleep(0.5)
        newest = {a["global_id__sys"]: f"changed 2 {a['id']}" for a in changed}
        for name, proc in procs.items():
            assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        after_pair = interactions(folder)
        stale = sum(after_pair[g] != [s] for g, s in newest.items())
        # the next scheduled run (its data interval holds the changes)
        assert world.run_dag("ctms_to_crm__demo", logical_date=hour + timedelta(hours=1)).state == "success"
        final = interactions(folder)
        source = {r["global_id__sys"]: r["subject__v"] for p in ctms.query(
            "SELECT global_id__sys, subject__v FROM crm_activity__v") for r in p.records}
        ctms.close()
        runs = world.ledger().recent_runs("demo", limit=5)
    pair = "; ".join(f"{r['window_start'][11:16]}-{r['window_end'][11:16]} {r['state']}" for r in runs[1:3])
    print(f"\n[overlap] two concurrent runs ({pair}); "
          f"{CHANGED} records changed 3 times while they ran; {stale} carried an older value right after the pair; "
          f"after the next scheduled run ({runs[0]['window_start'][11:16]}-{runs[0]['window_end'][11:16]}): "
          f"{sum(final[g] == [s] for g, s in newest.items())} of {CHANGED} newest")
    assert all(len(v) == 1 for v in after_pair.values()), "duplicates after the concurrent runs"
    assert all(len(v) == 1 for v in final.values()), "duplicates"
    assert len(final) == N
    assert {g: v[0] for g, v in final.items()} == source  # nothing lost, every value the newest



def test_an_older_extraction_loaded_last_does_not_overwrite_newer_values(tmp_path):
    """Deterministic interleaving of the overlap case, step by step in this process: run A extracts,
    validates and transforms; a record changes; run B (a whole DAG run) sends the change; then A
    loads. The newer value survives A's load: A's older version of the record is `superseded`."""
    from clinical_crm.engine import runner
    from clinical_crm.flows import ctms_to_crm
    from clinical_crm.vault import VaultClient
    from clinical_crm.config import load_connection

    folder = harness.copy_world(harness.seed_world(tmp_path / "seed", 60), tmp_path / "w")
    with harness.World(folder) as world:
        cfg = load_connection(folder / "connections" / "demo.yaml")
        ctms = VaultClient(world.ctms.url, harness.USER, harness.PASSWORD)
        crm = VaultClient(world.crm.url, harness.USER, harness.PASSWORD)
        try:
            start, end = harness.wide_window()
            flow = ctms_to_crm.build(cfg)
            run = runner.begin(flow, cfg, "backfill__a", None, None,
                               {"window_start": start.isoformat(), "window_end": end.isoformat()})
            staged = runner.extract(flow, cfg, run, {"ctms": ctms, "crm": crm})
            validated = runner.validate(flow, cfg, run, staged)
            records = runner.transform(flow, cfg, run, staged, validated)
            record = next(p for p in ctms.query("SELECT id, global_id__sys FROM crm_activity__v")).records[0]
            assert ctms.update("crm_activity__v",
                               [{"id": record["id"], "subject__v": "newest"}])[0].outcome == "updated"
            assert world.run_dag("ctms_to_crm__demo", harness.wide_window()).state == "success"
            assert interactions(folder)[record["global_id__sys"]] == ["newest"]
            runner.load(flow, cfg, run, crm, staged, records)
            history = world.ledger().record_history("demo", str(record["id"]))
            mine = [o for o in history["outcomes"] if o["dag_run_id"] == "backfill__a"]
            assert [o["outcome"] for o in mine] == ["superseded"], history["outcomes"]
            assert "a newer version" in mine[0]["message"]
        finally:
            ctms.close()
            crm.close()
    assert interactions(folder)[record["global_id__sys"]] == ["newest"]


def test_a_resend_after_a_lost_answer_never_writes_an_older_version_over_a_newer_one(tmp_path):
    """Issue 14, finding 2: run A's interaction write is applied by the vault but its answer is
    lost (a read timeout); meanwhile the source record changes and run B (another process, as a
    scheduled run beside a backfill) sends the newer value; then A sends its batch again. The
    newer value survives: B's load waits for A's (loads of one connection and object never
    overlap) and A's re-send re-checks the version guard. Before, B wrote first and A's client
    re-sent the older payload over it, and the ledger still said the newer one was written."""
    from clinical_crm.config import load_connection
    from clinical_crm.engine import runner
    from clinical_crm.flows import ctms_to_crm
    from clinical_crm.vault import VaultClient
    from clinical_crm.vault.errors import VaultTransientError

    folder = harness.copy_world(harness.seed_world(tmp_path / "seed", 60), tmp_path / "w")
    with harness.World(folder) as world:
        cfg = load_connection(folder / "connections" / "demo.yaml")
        ctms = VaultClient(world.ctms.url, harness.USER, harness.PASSWORD)
        crm = VaultClient(world.crm.url, harness.USER, harness.PASSWORD)
        flow, (start, end) = ctms_to_crm.build(cfg), harness.wide_window()
        run = runner.begin(flow, cfg, "backfill__a", None, None,
                           {"window_start": start.isoformat(), "window_end": end.isoformat()})
        staged = runner.extract(flow, cfg, run, {"ctms": ctms, "crm": crm})
        records = runner.transform(flow, cfg, run, staged, runner.validate(flow, cfg, run, staged))
        record = next(p for p in ctms.query("SELECT id, global_id__sys FROM crm_activity__v ORDER BY id")).records[0]
        home = tmp_path / "airflow_b"
        home.mkdir()
        shutil.copy(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db", home / "airflow.db")
        env = {**os.environ, **world.env, "AIRFLOW_HOME": str(home),
               "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}"}
        b_log = tmp_path / "b.log"
        procs = {}

        class LostAnswer:
            """The vault applies A's first interaction write, but the answer never arrives."""

            def __init__(self, client):
                self.client, self.lost = client, False

            def __getattr__(self, name):
                return getattr(self.client, name)

            def upsert(self, object_name, batch, id_param, batch_size=500, retry=True):
                results = self.client.upsert(object_name, batch, id_param, batch_size, retry=False)
                if object_name == cfg.crm.interaction.object and not self.lost:
                    self.lost = True
                    assert ctms.update("crm_activity__v",
                                       [{"id": record["id"], "subject__v": "newest"}])[0].outcome == "updated"
                    window = harness.wide_window()
                    procs["b"] = subprocess.Popen(
                        [sys.executable, str(HERE / "run_dag.py"), "ctms_to_crm__demo", window[1].isoformat(),
                         window[0].isoformat(), window[1].isoformat()],
                        env=env, stdout=open(b_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
                    # while A waits for its answer, B validates and reaches its load (before this
                    # change it wrote the newer value there; now it waits for A's load)
                    deadline = time.monotonic() + 300
                    while not any(r["dag_run_id"] != "backfill__a"
                                  and r["counts"].get("crm_activity__v", {}).get("valid")
                                  for r in world.ledger().recent_runs("demo", limit=5)):
                        assert procs["b"].poll() is None and time.monotonic() < deadline, b_log.read_text()[-3000:]
                        time.sleep(0.2)
                    quiet = time.monotonic() + 10
                    while procs["b"].poll() is None and time.monotonic() < quiet:
                        time.sleep(0.2)
                    raise VaultTransientError("TIMEOUT", "POST vobjects/clinical_interaction__v: ReadTimeout")
                return results

        try:
            runner.load(flow, cfg, run, LostAnswer(crm), staged, records)
            assert procs["b"].wait(timeout=300) == 0, b_log.read_text()[-3000:]
        finally:
            ctms.close()
            crm.close()
            if "b" in procs and procs["b"].poll() is None:
                procs["b"].kill()
        history = world.ledger().record_history("demo", str(record["id"]))
    assert interactions(folder)[record["global_id__sys"]] == ["newest"]
    newest = max(v["modified_date"] for v in history["versions"])
    assert [v["modified_date"] for v in history["versions"]] == [newest]  # the ledger knows the newest was written
