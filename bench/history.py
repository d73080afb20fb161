"""A small run and the page after a day, a month and a year of hourly runs (issue 20).

    .venv/bin/python bench/history.py                    # day, month, year (about 10 min on 2 cores)
    .venv/bin/python bench/history.py --points day month # fewer points
    .venv/bin/python bench/history.py --repeats 5

One world (the reliability harness's: the sandbox `scale` scenario, N activities and N flagged
CRM calls) is seeded and loaded once by a real run of both flows (untimed); that state (both
vaults, the ledger, the reports folder) is the base of every point. For each point (a day = 24,
a month = 720, a year = 8,760 hourly runs of connection `demo`):

1. Fabricate the history those runs leave, in bulk (sqlite3 executemany, not the ledger API
   row by row), as this code leaves it: per run and flow a `runs` row (the base run's counts),
   --outcomes per-record outcomes, two resolved quarantine rows and a DQ summary per object;
   an applied deletion mark every 10 runs; a reconciliation a day per flow with 5 drift rows;
   the run files (summary JSON, quarantine CSV and JSON: copies of the base run's, dated);
   the GX results and Data Docs pages of every run (copies of the base run's): the newest
   `retention.data_docs_runs` in the live project, the older ones in gx_archive, where each run
   moves them (engine/quality.py); a crashed run's staged files every week. Every file gets the
   modification time of its run.
2. Time a small real run --repeats times (median; one untimed round first): 50 Clinical
   Activities and 50 flagged CRM calls changed in the vaults, then both flows through the
   engine's runner steps in this process (begin, pre-step, extract, validate, transform, load,
   finish, as the DAG's tasks call them) over the window that holds the changes. The points'
   worlds are all up at once and measured in turn, the order turned each round, so that the
   shared machine's drifting load falls on every point alike.
3. Time the page's main views after each run (the plugin's FastAPI app, TestClient): the
   overview `/` and the quarantine triage `/quarantine?connection=demo`, the median of three
   requests after each run, and of those the median over the rounds (their sum is the figure);
   the record view `/record` of a record the history touched is printed apart.
4. Disk: the ledger (in use: SQLite pages minus free pages; and the file), reports and staging,
   before and after housekeeping (engine/housekeeping.py with the file's retention).

Last line: `HISTORY year/day: run <x> x; page <y> x; disk after housekeeping <z> MiB` (z: the
year's). Traffic: 127.0.0.1 only. Needs nothing but the repo's .venv.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "reliability"))
sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402  (tests/reliability: the worlds of the reliability tests)

POINTS = {"day": 24, "month": 720, "year": 8760}
CONNECTION = "demo"
FLOWS = ("ctms_to_crm", "crm_to_ctms")
CHANGED = 50


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _dated(path: Path, moment: datetime) -> None:
    stamp = moment.timestamp()
    os.utime(path, (stamp, stamp))


# ---------------------------------------------------------------- the base state


def real_run(world, tag: str, window: tuple[datetime, datetime]) -> float:
    """Both flows through the runner's steps in this process; returns the wall time."""
    from clinical_crm.config import load_connection
    from clinical_crm.engine import runner
    from clinical_crm.flows import build_all
    from clinical_crm.vault import VaultClient

    cfg = load_connection(world.folder / "connections" / "demo.yaml")
    params = {"window_start": window[0].isoformat(), "window_end": window[1].isoformat()}
    started = time.perf_counter()
    clients = {"ctms": VaultClient(world.ctms.url, harness.USER, harness.PASSWORD),
               "crm": VaultClient(world.crm.url, harness.USER, harness.PASSWORD)}
    try:
        for flow in build_all(cfg):
            ctx = runner.begin(flow, cfg, f"{tag}__{flow.name}", None, None, params)
            pre = runner.pre_step(flow, cfg, ctx, clients) if flow.pre_step else None
            staged = runner.extract(flow, cfg, ctx, clients, pre)
            validated = runner.validate(flow, cfg, ctx, staged)
            records = runner.transform(flow, cfg, ctx, staged, validated)
            runner.load(flow, cfg, ctx, clients[flow.target_side], staged, records)
            result = runner.finish(ctx)
            if result["state"] != "success":
                raise RuntimeError(f"{flow.name}: {result}")
    finally:
        for client in clients.values():
            client.close()
    return time.perf_counter() - started


def change_records(world, round_: int) -> None:
    """CHANGED activities and CHANGED flagged calls get a new subject (each round other ones)."""
    from clinical_crm.vault import VaultClient

    for server, obj, where in ((world.ctms, "crm_activity__v", "object_type__vr.api_name__v = 'clinical_activity__v'"),
                               (world.crm, "call2__v", "send_to_vault_clinical__v = true")):
        with VaultClient(server.url, harness.USER, harness.PASSWORD) as client:
            ids = sorted(r["id"] for page in client.query(f"SELECT id FROM {obj} WHERE {where}") for r in page.records)
            chosen = ids[(round_ * CHANGED) % len(ids):][:CHANGED]
            outcomes = client.update(obj, [{"id": i, "subject__v": f"history {round_} {i}"} for i in chosen])
            assert all(o.outcome == "updated" for o in outcomes), outcomes[:3]


# ---------------------------------------------------------------- fabricated history


class Templates:
    """The base run's files, copied for every fabricated run."""

    def __init__(self, reports: Path):
        self.run_files = {}
        for flow in FLOWS:
            folder = reports / CONNECTION / "runs" / flow
            self.run_files[flow] = sorted(folder.iterdir()) if folder.is_dir() else []
        gx = reports / CONNECTION / "gx"
        from clinical_crm.engine import quality

        self.results = sorted((gx / quality.RESULTS).rglob("*.json"))
        self.pages = sorted((gx / quality.PAGES).rglob("*.html"))
        self.gx = gx


def fabricate(folder: Path, hours: int, templates: Templates, outcomes_per_run: int, keep_runs: int) -> dict:
    from clinical_crm.engine import quality

    rng = random.Random(hours)
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    db = sqlite3.connect(folder / "data" / "ledger.db")
    base_counts = dict(db.execute("SELECT direction, counts FROM runs ORDER BY id").fetchall())
    objects = dict(db.execute("SELECT direction, object FROM dq_summaries GROUP BY direction").fetchall())
    next_id = (db.execute("SELECT max(id) FROM runs").fetchone()[0] or 0) + 1
    run_rows, outcome_rows, quarantine_rows, dq_rows, deletion_rows = [], [], [], [], []
    moments = {}
    for h in range(hours, 0, -1):
        end = now - timedelta(hours=h)
        name = f"scheduled__{end.strftime('%Y-%m-%dT%H:%M:%S')}+00:00"
        moments[name] = end
        for flow in FLOWS:
            run_id = next_id
            next_id += 1
            state = "failed" if rng.random() < 0.005 else "success"
            run_rows.append((run_id, CONNECTION, flow, name, _iso(end - timedelta(hours=1, minutes=10)), _iso(end), state,
                             base_counts.get(flow, "{}"), None, "", _iso(end), _iso(end + timedelta(minutes=2))))
            obj = objects.get(flow, "activity__v")
            for i in range(outcomes_per_run):
                outcome = "updated" if i % 10 else "created"
                outcome_rows.append((CONNECTION, flow, obj, f"H{h}-{i}", run_id, f"T{h}-{i}", outcome, _iso(end)))
            for i in range(2):
                quarantine_rows.append((CONNECTION, flow, obj, f"Q{h}-{i}", '["missing subject"]', _iso(end), _iso(end),
                                        run_id, _iso(end + timedelta(hours=3))))
                outcome_rows.append((CONNECTION, flow, obj, f"Q{h}-{i}", run_id, None, "quarantined", _iso(end)))
            dq_rows.append((run_id, CONNECTION, flow, obj, outcomes_per_run + 2, 2, 2 / (outcomes_per_run + 2),
                            '{"missing subject": 2}', 1, None, _iso(end)))
            if h % 10 == 0:
                deletion_rows.append((CONNECTION, flow, obj, f"D{h}", f"G{h}", "applied", 1, _iso(end), _iso(end), run_id))
    with db:
        db.executemany("INSERT INTO runs (id, connection, direction, dag_run_id, window_start, window_end, state, counts, "
                       "dq_report, message, started_at, ended_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", run_rows)
        db.executemany("INSERT INTO record_outcomes (connection, direction, object, source_id, run_id, target_id, outcome, at) "
                       "VALUES (?,?,?,?,?,?,?,?)", outcome_rows)
        db.executemany("INSERT INTO quarantine (connection, direction, object, source_id, reasons, first_seen, last_seen, "
                       "last_run_id, resolved_at) VALUES (?,?,?,?,?,?,?,?,?)", quarantine_rows)
        db.executemany("INSERT INTO dq_summaries (run_id, connection, direction, object, rows, failing_rows, failing_share, "
                       "reasons, success, report_path, at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", dq_rows)
        db.executemany("INSERT INTO deletion_queue (connection, direction, object, source_id, global_id, state, attempts, "
                       "first_seen, updated_at, run_id) VALUES (?,?,?,?,?,?,?,?,?,?)", deletion_rows)
        for day in range(hours // 24):
            moment = now - timedelta(days=day)
            for flow in FLOWS:
                rid = db.execute("INSERT INTO reconcile_runs (connection, flow, dag_run_id, repair, state, summary, "
                                 "started_at, ended_at) VALUES (?,?,?,0,'success','{}',?,?)",
                                 (CONNECTION, flow, f"reconcile_{day}", _iso(moment), _iso(moment))).lastrowid
                db.executemany("INSERT INTO drift (connection, flow, run_id, object, source_id, external_id, kind, detected_at) "
                               "VALUES (?,?,?,?,?,?,'stale',?)",
                               [(CONNECTION, flow, rid, "call2__v", f"S{day}-{i}", f"X{day}-{i}", _iso(moment))
                                for i in range(5)])
    db.close()
    # run files: the base run's, per fabricated run and flow
    reports = folder / "data" / "reports" / CONNECTION
    files = 0
    for name, moment in moments.items():
        for flow in FLOWS:
            for template in templates.run_files[flow]:
                suffix = template.name[template.name.index("."):] if "." in template.name else ""
                target = reports / "runs" / flow / f"{name.replace(':', '_').replace('+', '_')}{suffix}"
                shutil.copyfile(template, target)
                _dated(target, moment)
                files += 1
    # GX results and pages: the newest keep_runs - 1 live (the next real run is the last of the
    # window), the older ones in the archive, as the runs move them
    by_time = sorted(moments, key=moments.get, reverse=True)  # type: ignore[arg-type]
    archive = quality.archive_dir(templates.gx)
    for index, name in enumerate(by_time):
        moment = moments[name]
        stamp = moment.strftime("%Y%m%dT%H%M%S.%fZ")
        live = index < keep_runs - 1
        for kind, sources, base in (("results", templates.results, quality.RESULTS),
                                    ("pages", templates.pages, quality.PAGES)):
            root = templates.gx / base
            for template in sources:
                parts = template.relative_to(root).parts  # <conn>/<object>/<suite>/<run>/<time>/<batch>
                suite = Path(*parts[:quality.SUITE_DEPTH])
                where = (root if live else archive / kind) / suite / name / stamp
                where.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(template, where / parts[-1])
                for path in (where / parts[-1], where, where.parent):
                    _dated(path, moment)
                files += 1
    # a crashed run's staged files every week
    staging = folder / "data" / "staging" / CONNECTION / FLOWS[0]
    for week in range(hours // (24 * 7)):
        moment = now - timedelta(days=7 * week + 1)
        run = staging / f"crashed_{week}"
        run.mkdir(parents=True, exist_ok=True)
        for part in ("activities", "persons", "sites"):
            (run / f"{part}.parquet").write_bytes(os.urandom(200_000))
            _dated(run / f"{part}.parquet", moment)
        files += 3
    return {"runs": len(run_rows), "outcomes": len(outcome_rows), "quarantine": len(quarantine_rows), "files": files}


# ---------------------------------------------------------------- measures


def disk(folder: Path) -> dict[str, float]:
    """MiB: the ledger in use (pages minus free pages), its file, the reports, the staging."""
    data = folder / "data"
    db = sqlite3.connect(data / "ledger.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages, free, size = (db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size"))
    db.close()

    def tree(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0

    mib = 2 ** 20
    return {"ledger": (pages - free) * size / mib, "ledger_file": (data / "ledger.db").stat().st_size / mib,
            "reports": tree(data / "reports") / mib, "staging": tree(data / "staging") / mib}


def total(d: dict[str, float]) -> float:
    return d["ledger"] + d["reports"] + d["staging"]


def page_times(client) -> dict[str, float]:
    """One timed request of each main view (after three warm-up requests the first time)."""
    views = {"overview": "/", "quarantine": f"/quarantine?connection={CONNECTION}",
             "record": f"/record?connection={CONNECTION}&source_id=Q1-0"}
    out = {}
    for name, url in views.items():
        started = time.perf_counter()
        response = client.get(url)
        out[name] = time.perf_counter() - started
        assert response.status_code == 200, (url, response.text[:500])
    return out


class Point:
    """One point's world: its copy of the base state, its fabricated history, its sandboxes."""

    def __init__(self, base: Path, work: Path, name: str, hours: int, args):
        from clinical_crm.config import load_connection

        self.name, self.hours = name, hours
        self.folder = work / name
        shutil.copytree(base, self.folder)
        self.cfg = load_connection(self.folder / "connections" / "demo.yaml")
        started = time.perf_counter()
        self.made = fabricate(self.folder, hours, Templates(self.folder / "data" / "reports"), args.outcomes,
                              self.cfg.retention.data_docs_runs)
        print(f"[{name}] fabricated {hours} hourly runs: {self.made} in {time.perf_counter() - started:.0f} s", flush=True)
        self.world = harness.World(self.folder, batch_size=500)
        self.runs: list[float] = []
        self.pages: dict[str, list[float]] = {"overview": [], "quarantine": [], "record": []}

    def use(self) -> None:
        """Point this process's settings (ledger, data dir, connections, Airflow connections) here."""
        os.environ.update(self.world.env)

    def client(self):
        from fastapi.testclient import TestClient

        from clinical_crm.airflow import plugin

        self.use()
        return TestClient(plugin.create_app(require_airflow_login=False))

    def measure(self, round_: int, timed: bool) -> None:
        self.use()
        gc.collect()  # not the garbage of the point before
        changed_from = datetime.now(timezone.utc) - timedelta(seconds=2)  # this round's changes only
        change_records(self.world, round_ + 1)
        took = real_run(self.world, f"bench_{self.name}_{round_}",
                        (changed_from, datetime.now(timezone.utc) + timedelta(minutes=1)))
        client = self.client()
        if not timed:
            for _ in range(3):
                page_times(client)
            return
        self.runs.append(took)
        gc.collect()
        samples = [page_times(client) for _ in range(3)]
        for view in self.pages:
            self.pages[view].append(statistics.median(p[view] for p in samples))

    def finish(self) -> dict:
        from clinical_crm.engine import housekeeping
        from clinical_crm.engine.ledger import Ledger

        self.use()
        result: dict = {"point": self.name, "hours": self.hours, "fabricated": self.made, "runs_s": self.runs,
                        "run_s": statistics.median(self.runs),
                        "page_s": {view: statistics.median(times) for view, times in self.pages.items()},
                        "page_min_s": {view: min(times) for view, times in self.pages.items()},
                        "disk_before": disk(self.folder)}
        started = time.perf_counter()
        result["removed"] = housekeeping.housekeep(self.cfg, Ledger(self.world.env["CLINICAL_CRM_LEDGER_URL"]))
        result["housekeeping_s"] = time.perf_counter() - started
        result["disk_after"] = disk(self.folder)
        client = self.client()
        after = [page_times(client) for _ in range(3)]
        result["page_after_s"] = {view: statistics.median(p[view] for p in after) for view in after[0]}
        pages = result["page_s"]
        print(f"[{self.name}] run {result['run_s']:.2f} s (median of {len(self.runs)}: "
              f"{', '.join(f'{r:.2f}' for r in self.runs)}); page / {pages['overview'] * 1000:.0f} ms, /quarantine "
              f"{pages['quarantine'] * 1000:.0f} ms, /record {pages['record'] * 1000:.0f} ms; after housekeeping "
              f"/ {result['page_after_s']['overview'] * 1000:.0f} ms, /record {result['page_after_s']['record'] * 1000:.0f} ms",
              flush=True)
        print(f"[{self.name}] disk before housekeeping {total(result['disk_before']):.1f} MiB "
              f"({', '.join(f'{k} {v:.1f}' for k, v in result['disk_before'].items())}); after "
              f"{total(result['disk_after']):.1f} MiB ({', '.join(f'{k} {v:.1f}' for k, v in result['disk_after'].items())}); "
              f"housekeeping {result['housekeeping_s']:.1f} s removed {result['removed']}", flush=True)
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--n", type=int, default=1000, help="records seeded on each side (default 1,000)")
    parser.add_argument("--outcomes", type=int, default=50, help="per-record outcomes per fabricated run and flow")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="history_"))
    try:
        base = harness.seed_world(work / "base", args.n)
        with harness.World(base, batch_size=500) as world:
            took = real_run(world, "base", harness.wide_window())
        print(f"base: {args.n} records each way loaded in {took:.1f} s", flush=True)
        points = [Point(base, work, name, POINTS[name], args) for name in args.points]
        with contextlib.ExitStack() as stack:
            for p in points:
                stack.enter_context(p.world)
            # interleaved, the order turned each round: the shared machine's load drifts over
            # minutes, and each point gets its share of every stretch of it
            for round_ in range(args.repeats + 1):
                order = points[round_ % len(points):] + points[:round_ % len(points)]
                for p in order:
                    p.measure(round_, timed=round_ > 0)
            results = {p.name: p.finish() for p in points}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    first, last = results[args.points[0]], results[args.points[-1]]

    def page(r: dict) -> float:
        return r["page_s"]["overview"] + r["page_s"]["quarantine"]

    def min_page(r: dict) -> float:
        return r["page_min_s"]["overview"] + r["page_min_s"]["quarantine"]

    print(f"(the same by the fastest of each: run {min(last['runs_s']) / min(first['runs_s']):.2f} x; "
          f"page {min_page(last) / min_page(first):.2f} x)")
    print(f"HISTORY {args.points[-1]}/{args.points[0]}: run {last['run_s'] / first['run_s']:.2f} x; "
          f"page {page(last) / page(first):.2f} x; disk after housekeeping {total(last['disk_after']):.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
