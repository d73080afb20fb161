"""The ledger's schema, kept by Alembic: `upgrade(engine)` brings any ledger to the newest
revision when it is opened. A ledger made before Alembic (no alembic_version table) is
upgraded in place: the first revision creates only what is missing."""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

# Not alembic_version: the ledger may share a database with Airflow's own metadata (the compose
# deployment and the Celery test do), whose Alembic keeps its revision in alembic_version.
VERSION_TABLE = "clinical_crm_ledger_version"


def _config(connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def head() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(None)).get_current_head()


def current(engine: Engine) -> str | None:
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, strict: bool = False) -> None:
    """Upgrade to the newest revision (nothing to do, and no lock taken, when it is there).
    Two processes opening a new ledger at once may both try: the loser finds it done. A role
    that may not change the schema (not the tables' owner) uses the ledger as it is, with a
    warning, unless `strict`."""
    from alembic import command
    from sqlalchemy.exc import SQLAlchemyError

    if current(engine) == head():
        return
    try:
        with engine.begin() as connection:
            command.upgrade(_config(connection), "head")
    except SQLAlchemyError as exc:
        if current(engine) == head():
            log.info("ledger schema upgraded by another process meanwhile")
            return
        if strict:
            raise
        log.warning("could not upgrade the ledger schema to revision %s as this database role (%s); it is "
                    "used as it is. Run `python -m clinical_crm ledger-upgrade` as the tables' owner.",
                    head(), str(exc).splitlines()[0])
