"""API calls of reconciliation against the read floor of both sides, over a seeded `scale` state.

    .venv/bin/python bench/reconcile_calls.py              # N = 10,000
    .venv/bin/python bench/reconcile_calls.py --n 1000 --stale 10 --repair

1. Seed both vaults with the `scale` scenario (bench/floor.py's seed: N Clinical Activities on
   N/20 Persons, N/1000+1 Studies with 2 Sites each, one CRM Account per Person).
2. Send everything once: the runner's steps of `ctms_to_crm` in a child process (the bench
   connection of floor.py: clinical activities + studies/sites), so CRM holds the targets and
   the ledger its id map; in a child so that this process's peak RSS is reconciliation's own
   (an in-process send left 564 MiB behind at 100,000 before reconciliation started).
3. Optionally plant `--stale` changed interactions (edited in CRM).
4. Reconcile both flows (engine.reconcile, in this process; with --repair, repairing), counting
   the calls the sandboxes serve by endpoint and the query pages the client reads per object.
5. The read floor: for each object read, ceil(rows / 1000) pages (the vault's page size), from
   the rows each side holds; and for each object whose deletions were read, ceil(deleted ids
   / 5000) calls, at least 1 (the deletions API's largest `limit`, which the client uses).

Prints the figures (and --json FILE writes them). Auth/logout calls are shown apart.

    --phases        also print the RSS by phase of reconciliation (start, end and peak of
                    `_read`, `in_scope`, `_valid_rows`, `runner.transform`, `TargetCheck.__init__`,
                    `TargetCheck.drift`, `TargetCheck.repair`) and at the start of each validated
                    block: where the peak is
    --state DIR     seed and send into DIR and keep it; a later run with the same DIR and N
                    reconciles that state again without seeding or sending (minutes at 1,000,000;
                    not with --repair, which changes the state)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import floor  # noqa: E402  (bench/floor.py: seeding, servers, the bench connection file)

PAGE = 1000
DELETIONS_PAGE = 5000  # Vault's largest deletions `limit`, read with by the client


def counting_queries(pages: Counter):
    """Wrap VaultClient.query: query pages read, per object of the FROM clause."""
    from clinical_crm.vault.client import VaultClient

    original = VaultClient.query

    def query(self, statement):
        text = statement.statement if hasattr(statement, "statement") else str(statement)
        obj = re.search(r"\bFROM\s+(\w+)", text, re.I).group(1)
        for page in original(self, statement):
            pages[obj] += 1
            yield page

    VaultClient.query = query


class PhaseRss:
    """The process RSS at the start and end of each of reconciliation's phases and its peak
    within each (sampled every 20 ms), in MiB; `mark(name)` notes the RSS at a point inside one
    (the start of each validated block). Wraps the module functions, so install it before the
    reconciliation starts."""

    PHASES = (("reconcile", "_read"), ("reconcile", "in_scope"), ("reconcile", "_valid_rows"),
              ("runner", "transform"), ("TargetCheck", "__init__"), ("TargetCheck", "drift"),
              ("TargetCheck", "repair"))

    def __init__(self):
        import threading

        import psutil

        self.me, self.lock = psutil.Process(), threading.Lock()
        self.rows: list[dict] = []
        self.current: dict | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def rss(self) -> int:
        return round(self.me.memory_info().rss / 2**20)

    def _sample(self):
        while not self.stop.is_set():
            rss = self.rss()
            with self.lock:
                if self.current is not None:
                    self.current["peak"] = max(self.current["peak"], rss)
            self.stop.wait(0.02)

    def install(self) -> PhaseRss:
        import functools

        from clinical_crm.engine import quality, reconcile, runner

        owners = {"reconcile": reconcile, "runner": runner, "TargetCheck": reconcile.TargetCheck}
        for owner, name in self.PHASES:
            target = owners[owner]
            original = getattr(target, name)

            def wrapped(*args, _original=original, _label=f"{owner}.{name}", **kwargs):
                return self.phase(_label, _original, *args, **kwargs)

            setattr(target, name, functools.wraps(original)(wrapped))
        block_init = quality.CheckedRows.__init__

        def checked_rows(rows_self, *args, **kwargs):
            self.mark("block")
            block_init(rows_self, *args, **kwargs)

        quality.CheckedRows.__init__ = checked_rows
        self.thread.start()
        return self

    @staticmethod
    def _of(args) -> str:
        """What the phase works on: the flow's name, or the target object of a TargetCheck."""
        first = args[0] if args else None
        if hasattr(first, "target_object"):
            return first.target_object
        if len(args) > 2 and hasattr(args[2], "target_object"):  # TargetCheck.__init__(self, flow, target, ...)
            return args[2].target_object
        return getattr(first, "name", "")

    def phase(self, label: str, function, *args, **kwargs):
        rss = self.rss()
        row = {"phase": f"{label} {self._of(args)}".strip(), "start": rss, "peak": rss, "end": None, "marks": []}
        with self.lock:
            outer, self.current = self.current, row
            self.rows.append(row)
        try:
            return function(*args, **kwargs)
        finally:
            row["end"] = self.rss()
            row["peak"] = max(row["peak"], row["end"])
            with self.lock:
                self.current = outer
                if outer is not None:
                    outer["peak"] = max(outer["peak"], row["peak"])

    def mark(self, name: str) -> None:
        with self.lock:
            if self.current is not None:
                self.current["marks"].append(self.rss())

    def close(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        return self.rows

    @staticmethod
    def lines(rows: list[dict]) -> list[str]:
        out = []
        for r in rows:
            text = f"  {r['phase']:52} start {r['start']:>5} end {r['end']:>5} peak {r['peak']:>5} MiB"
            if r["marks"]:
                text += " (at each block: " + ", ".join(map(str, r["marks"])) + ")"
            out.append(text)
        return out


class PeakRss:
    """The process's peak RSS while the block runs (sampled every 50 ms), in MiB."""

    def __enter__(self):
        import threading

        import psutil

        me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.before = round(me.memory_info().rss / 2**20)

        def sample():
            while not self.stop.is_set():
                self.peak = max(self.peak, me.memory_info().rss)
                self.stop.wait(0.05)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mib = round(self.peak / 2**20)


def send_everything(cfg, clients, window) -> None:
    from clinical_crm.engine import runner
    from clinical_crm.flows import build

    f = build("ctms_to_crm", cfg)
    ctx = runner.begin(f, cfg, "bench-send", window[0], window[1])
    staged = runner.extract(f, cfg, ctx, clients)
    records = runner.transform(f, cfg, ctx, staged, runner.validate(f, cfg, ctx, staged))
    runner.load(f, cfg, ctx, clients["crm"], staged, records)
    runner.finish(ctx)


def _send_in_child(config: str, ctms_url: str, crm_url: str, window) -> None:
    import yaml

    from clinical_crm.config import parse_connection
    from clinical_crm.vault.client import VaultClient

    cfg = parse_connection(yaml.safe_load(config), "bench.yaml")
    with VaultClient(ctms_url, floor.USER, floor.PASSWORD) as ctms, VaultClient(crm_url, floor.USER, floor.PASSWORD) as crm:
        send_everything(cfg, {"ctms": ctms, "crm": crm}, window)


def send_apart(config: str, ctms_url: str, crm_url: str, window) -> None:
    """send_everything in a child process (spawned: nothing of this process's heap)."""
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_send_in_child, args=(config, ctms_url, crm_url, window))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"the send failed in its child process (exit code {child.exitcode})")


def totals(client, objects: list[str]) -> dict[str, int]:
    """Rows each object holds (one PAGESIZE 1 query each, made before the counters are reset)."""
    out = {}
    for obj in objects:
        body = client._call("POST", "query", "query", data={"q": f"SELECT id FROM {obj} PAGESIZE 1"}).body
        out[obj] = int(body["responseDetails"]["total"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--stale", type=int, default=0, help="interactions to edit in CRM before reconciling")
    parser.add_argument("--repair", action="store_true", help="repair what drifted (write calls: ceil(K / 500))")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--phases", action="store_true", help="print the RSS by phase of reconciliation")
    parser.add_argument("--state", type=Path, help="keep the seeded and sent state in this folder; reuse it when "
                                                   "it holds one of the same N")
    args = parser.parse_args(argv)
    if args.state and args.repair:
        parser.error("--state keeps the vaults for later runs: a repair would change them")
    work = args.state.resolve() if args.state else Path(tempfile.mkdtemp(prefix="reconcile_bench_"))
    sent_marker = work / "sent.json"
    reused = bool(args.state) and sent_marker.exists() and json.loads(sent_marker.read_text()).get("n") == args.n
    if args.state and not reused and work.exists():
        import shutil

        shutil.rmtree(work)
    os.environ["CLINICAL_CRM_DATA_DIR"] = str(work / "data")
    import yaml

    from clinical_crm.config import parse_connection
    from clinical_crm.engine import reconcile
    from clinical_crm.flows import build_all
    from clinical_crm.vault.client import VaultClient

    t0 = time.perf_counter()
    if not reused:
        floor.seed(work, args.n, 1, floor.NOW)
    config = floor.bench_config()
    cfg = parse_connection(yaml.safe_load(config), "bench.yaml")
    window = floor.window_of(floor.NOW)
    ctms_s, crm_s = floor.servers(work)
    with ctms_s, crm_s, VaultClient(ctms_s.url, floor.USER, floor.PASSWORD) as ctms, \
            VaultClient(crm_s.url, floor.USER, floor.PASSWORD) as crm:
        clients = {"ctms": ctms, "crm": crm}
        if not reused:
            send_apart(config, ctms_s.url, crm_s.url, window)
            if args.state:
                sent_marker.write_text(json.dumps({"n": args.n}))
        seeded = time.perf_counter() - t0
        if args.stale:
            ids = [r["id"] for page in crm.query(f"SELECT id FROM {cfg.crm.interaction.object} PAGESIZE {args.stale}")
                   for r in page.records][:args.stale]
            crm.update(cfg.crm.interaction.object,
                       [{"id": i, cfg.crm.interaction.fields.subject: "Edited"} for i in ids])
        rows = {"ctms": totals(ctms, [cfg.ctms.activity.object, cfg.ctms.study.object, cfg.ctms.site.object]),
                "crm": totals(crm, [cfg.crm.account.object, cfg.crm.interaction.object,
                                    cfg.crm.clinical_study.object, cfg.crm.clinical_site.object])}
        for server in (ctms_s, crm_s):
            server.admin.reset_counters()
        pages: Counter = Counter()
        counting_queries(pages)
        phases = PhaseRss().install() if args.phases else None
        started = time.perf_counter()
        with PeakRss() as rss:
            summaries = {f.name: reconcile.reconcile(f, cfg, clients, f"bench-{datetime.now().isoformat()}",
                                                     repair=args.repair) for f in build_all(cfg)}
        seconds = time.perf_counter() - started
        phase_rows = phases.close() if phases is not None else []
        endpoints = {side: floor.split_counters(s.admin.counters()) for side, s in (("ctms", ctms_s), ("crm", crm_s))}
        # deletions floor of each object whose deletions reconciliation read (counted after the
        # snapshot above, so these reads are not in it)
        until = datetime.now().astimezone()
        deletions_floor = {
            f"{side}:{key.rsplit('/', 1)[1]}": math.ceil(sum(len(p) for p in clients[side].deletions(
                key.rsplit("/", 1)[1], until - timedelta(days=30), until)) / DELETIONS_PAGE) or 1
            for side, c in endpoints.items() for key in c[2] if "/objects/deletions/" in key}
    read_floor = {obj: math.ceil(n / PAGE) or 1 for side in rows.values() for obj, n in side.items()}
    result = {"n": args.n, "stale_planted": args.stale, "repair": args.repair, "rows": rows,
              "reconcile_seconds": round(seconds, 1),
              "rss_mib_before_reconcile": rss.before, "peak_rss_mib_during_reconcile": rss.mib,
              "seed_and_send_seconds": round(seeded, 1),
              "calls": {side: {"data": c[0], "auth": c[1], "endpoints": c[2]} for side, c in endpoints.items()},
              "pages_by_object": dict(pages), "floor_pages_by_object": read_floor,
              "floor_deletions_calls": deletions_floor,
              "drift": {f: s["objects"] for f, s in summaries.items()},
              "state_reused": reused, "rss_by_phase_mib": phase_rows}
    data_calls = sum(c[0] for c in endpoints.values())
    floor_calls = sum(read_floor.values()) + sum(deletions_floor.values())
    result.update(data_calls=data_calls, floor_calls=floor_calls, ratio=round(data_calls / floor_calls, 2))

    print(f"reconcile{' with repair' if args.repair else ''}, N = {args.n:,}, {args.stale} stale planted: "
          f"{seconds:.1f} s, RSS {rss.before} -> peak {rss.mib} MiB "
          f"({'state of ' + str(work) + ' reused' if reused else f'seed + send: {seeded:.1f} s'})")
    if phase_rows:
        print("RSS by phase (MiB, in order; nested phases inside their flow's):")
        print("\n".join(PhaseRss.lines(phase_rows)))
    print(f"{'object':28} {'rows':>8} {'floor pages':>12} {'pages read':>11}")
    for obj, n in {k: v for side in rows.values() for k, v in side.items()}.items():
        print(f"{obj:28} {n:>8,} {read_floor[obj]:>12} {pages.get(obj, 0):>11}")
    for obj in sorted(set(pages) - set(read_floor)):
        print(f"{obj:28} {'':>8} {'':>12} {pages[obj]:>11}")
    for obj, calls in sorted(deletions_floor.items()):
        print(f"{'deletions ' + obj:28} {'':>8} {calls:>12}")
    for side, (data, auth, by_endpoint) in endpoints.items():
        print(f"{side}: {data} data calls ({auth} auth/logout): " + ", ".join(f"{k} {v}" for k, v in by_endpoint.items()))
    print(f"total: {data_calls} data calls against a read floor of {floor_calls} calls "
          f"(pages and deletions calls): x{result['ratio']}")
    pages_floor, deletion_calls = sum(read_floor.values()), sum(deletions_floor.values())
    print(f"RECONCILE N={args.n}: calls {data_calls} <= 1.02 x {pages_floor} pages + {deletion_calls} deletions calls "
          f"= {1.02 * pages_floor + deletion_calls:.0f}: {'yes' if data_calls <= 1.02 * pages_floor + deletion_calls else 'no'}; "
          f"peak RSS {rss.mib} MiB (< 700: {'yes' if rss.mib < 700 else 'no'})")
    print("drift:", json.dumps(result["drift"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.state:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
