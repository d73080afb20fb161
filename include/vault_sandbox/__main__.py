"""Command line: ``python -m vault_sandbox serve ...`` and ``python -m vault_sandbox seed ...``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from vault_sandbox.control import FAULT_KINDS, FaultConfig, latency_profile


def _now(text: str | None) -> datetime:
    if not text:
        return datetime.now(timezone.utc)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _names(text: str) -> list[str]:
    """A comma-separated option value as a list."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _kinds(text: str) -> list[str]:
    kinds = _names(text)
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}; known: {','.join(FAULT_KINDS)}")
    return kinds


def _latency(text: str):
    try:
        return latency_profile(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_seed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vault-id", type=int, help="vault id reported by auth and carried by global ids "
                                                "(default: CTMS 1001, CRM 2002)")
    p.add_argument("--seed-number", type=int, default=1, help="random seed of the data (default 1)")
    p.add_argument("--now", help="ISO timestamp the seed data is relative to (default: the current time)")
    p.add_argument("--activities", type=int, default=100_000, help="scale scenario: Clinical Activities")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m vault_sandbox", description="Vault REST API sandbox")
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve one vault over HTTP")
    serve.add_argument("--app", choices=["ctms", "crm"], required=True)
    serve.add_argument("--port", type=int, default=8001)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--db", required=True, help="SQLite file (created when missing)")
    serve.add_argument("--seed", choices=["demo", "scale", "users", "none"], default="none",
                       help="seed an EMPTY database at start (an existing one is kept)")
    serve.add_argument("--reseed", action="store_true", help="with --seed: wipe and seed even a non-empty database")
    _add_seed_options(serve)
    serve.add_argument("--burst-limit", type=int, default=2000, help="calls per burst window (default 2000)")
    serve.add_argument("--burst-window-seconds", type=float, default=300.0)
    serve.add_argument("--burst-delay-ms", type=int, default=500, help="delay per call past the burst limit")
    serve.add_argument("--auth-limit", type=int, default=120, help="auth calls per minute (default 120)")
    serve.add_argument("--auth-window-seconds", type=float, default=60.0,
                       help="window of the auth limit (default 60: Vault's one minute)")
    serve.add_argument("--session-idle-seconds", type=float, default=1200.0)
    serve.add_argument("--session-max-seconds", type=float, default=48 * 3600.0,
                       help="a session ends this long after its login, whatever the activity (Vault: 48 h)")
    serve.add_argument("--page-size", type=int, default=1000, help="default and maximum VQL page size")
    serve.add_argument("--inactive-object-types", type=_names, default=[],
                       help="comma-separated object types no admin has activated, as object.type "
                            "(e.g. crm_activity__v.medical_activity__v)")
    serve.add_argument("--fault-rate", type=float, default=0.0, help="share of calls that get a fault (0..1)")
    serve.add_argument("--fault-kinds", type=_kinds, default=list(FAULT_KINDS),
                       help=f"comma-separated subset of {','.join(FAULT_KINDS)}")
    serve.add_argument("--fault-seed", type=int, default=0)
    serve.add_argument("--slow-seconds", type=float, default=3.0, help="sleep of a 'slow' fault")
    serve.add_argument("--latency", type=_latency, default=latency_profile("none"), metavar="PROFILE",
                       help="time each call takes: none (default), vault (assumed figures) or a YAML/JSON file "
                            "(see docs/sandbox.md)")
    serve.add_argument("--latency-seed", type=int, default=0, help="seed of the latency jitter")
    serve.add_argument("--log-level", default="warning")

    seed = sub.add_parser("seed", help="(re)seed a database")
    seed.add_argument("--app", choices=["ctms", "crm"], required=True)
    seed.add_argument("--db", required=True)
    seed.add_argument("--scenario", choices=["demo", "scale", "users"], default="demo")
    _add_seed_options(seed)
    return root


def run_seed(app: str, db: str, scenario: str, seed_number: int, now: datetime, activities: int,
             vault_id: int | None = None) -> dict:
    from vault_sandbox.db import Store
    from vault_sandbox.models import load_model
    from vault_sandbox.seed import seed_demo, seed_scale, seed_users

    store = Store(load_model(app, vault_id), db)
    if scenario == "demo":
        return seed_demo(store, seed_number, now)
    if scenario == "users":
        return seed_users(store, now)
    return seed_scale(store, activities, seed_number, now)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "seed":
        started = time.perf_counter()
        counts = run_seed(args.app, args.db, args.scenario, args.seed_number, _now(args.now), args.activities,
                          args.vault_id)
        print(json.dumps({"app": args.app, "scenario": args.scenario, "counts": counts,
                          "seconds": round(time.perf_counter() - started, 2)}))
        return 0

    import uvicorn

    from vault_sandbox.app import Options, build_asgi
    from vault_sandbox.db import Store
    from vault_sandbox.models import load_model
    from vault_sandbox.seed import is_empty

    if args.seed != "none" and (args.reseed or is_empty(Store(load_model(args.app), args.db))):
        run_seed(args.app, args.db, args.seed, args.seed_number, _now(args.now), args.activities, args.vault_id)
    options = Options(vault_id=args.vault_id, burst_limit=args.burst_limit,
                      burst_window_seconds=args.burst_window_seconds,
                      burst_delay_ms=args.burst_delay_ms, auth_limit=args.auth_limit,
                      auth_window_seconds=args.auth_window_seconds, session_idle_seconds=args.session_idle_seconds,
                      session_max_seconds=args.session_max_seconds, page_size=args.page_size,
                      inactive_object_types=args.inactive_object_types,
                      fault=FaultConfig(rate=args.fault_rate, kinds=args.fault_kinds, seed=args.fault_seed,
                                        slow_seconds=args.slow_seconds),
                      latency=args.latency, latency_seed=args.latency_seed)
    try:
        app = build_asgi(args.app, args.db, options)
    except ValueError as exc:     # a configuration that does not fit the model or the database
        print(f"python -m vault_sandbox serve: error: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
