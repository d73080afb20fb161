"""Command line: `python -m clinical_crm preflight|validate CONNECTION_FILE...`, `ledger-upgrade`.

The vault credentials come from the Airflow connections the file names (ctms_conn_id,
crm_conn_id): Airflow's metadata database, AIRFLOW_CONN_* variables or a secrets backend.
Exit status: 0 when every check passes, 1 when a check fails, 2 when the file is invalid.
"""
from __future__ import annotations

import argparse
import logging
import sys

from clinical_crm.config import load_connection
from clinical_crm.errors import ConfigError


def _client_for(conn_id: str):
    from clinical_crm.airflow.hooks import VaultHook  # imports Airflow: only when a vault is needed

    return VaultHook(conn_id).get_client(max_retries=2)


def preflight(path: str) -> int:
    from clinical_crm.preflight import report, run_preflight

    try:
        cfg = load_connection(path)
    except ConfigError as exc:
        print(f"FAIL  config {exc}")
        return 2
    checks = run_preflight(cfg, _client_for)
    print(report(cfg, checks))
    return 1 if any(c.failed for c in checks) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clinical_crm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("preflight", help="check a connection file against both vaults")
    check.add_argument("connection_file", help="e.g. include/connections/demo.yaml")
    commands.add_parser("validate", help="only validate connection files (no vault calls)").add_argument(
        "connection_file", nargs="+")
    commands.add_parser("ledger-upgrade", help="bring the ledger's schema to the newest revision (Alembic)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clinical_crm").setLevel(logging.WARNING)  # the report is the output
    if args.command == "preflight":
        return preflight(args.connection_file)
    if args.command == "ledger-upgrade":
        from sqlalchemy import create_engine

        from clinical_crm import settings
        from clinical_crm.engine.migrations import current, upgrade

        engine = create_engine(settings.ledger_url())
        upgrade(engine, strict=True)
        print(f"ledger at revision {current(engine)}")
        return 0
    status = 0
    for path in args.connection_file:
        try:
            cfg = load_connection(path)
            print(f"OK    {path}: connection {cfg.name!r}")
        except ConfigError as exc:
            print(f"FAIL  {exc}")
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
