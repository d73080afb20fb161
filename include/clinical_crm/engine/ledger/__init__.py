"""The sync ledger: what each run did, record by record (SQLAlchemy 2; SQLite by default).

One `Ledger` composed of parts, one module per concern, each on the tables of `schema` (the
modules are not named after tables: `ledger.runs`, `ledger.quarantine`, `ledger.drift` are the
tables, which the migrations and tests import from here):

- `schema`: the tables, the engine (SQLite pragmas) and the Alembic upgrade on opening;
- `run_log`: runs, their counts and data-quality summaries, the last completed window, the load lock;
- `records`: record outcomes, the id map and the source versions written to the target;
- `quarantine_log`: records held back until they go through, and the page's retry / ignore;
- `deletions`: the deletion queue (each deletion mark written once, none forgotten);
- `reconciliation`: reconciliation runs and the drift they found;
- `views` and `triage`: the read API the Airflow UI plugin relies on (plain dicts).

The engine works through the scoped views (`scoped`): `ledger.scope(connection, direction,
object_name)` and `ledger.id_map(connection, target_object)`, which take the triple once. The
Ledger's own methods with the triple stay for the callers not moved yet; both are one
implementation.
"""
from __future__ import annotations

from clinical_crm import settings
from clinical_crm.engine.ledger.deletions import Deletions
from clinical_crm.engine.ledger.quarantine_log import Quarantine
from clinical_crm.engine.ledger.reconciliation import Reconciliation
from clinical_crm.engine.ledger.records import Records
from clinical_crm.engine.ledger.run_log import COMPLETED_STATES, Runs  # noqa: F401 (COMPLETED_STATES: re-exported)
from clinical_crm.engine.ledger.schema import (  # noqa: F401  (the tables: migrations and tests import them from here)
    _ENGINES,
    FLOW_NAME_MAX,
    QUARANTINE_ACTIONS,
    _engine,
    deletion_queue,
    dq_summaries,
    drift,
    id_map,
    metadata,
    quarantine,
    quarantine_actions,
    reconcile_runs,
    record_outcomes,
    runs,
    source_versions,
)
from clinical_crm.engine.ledger.scoped import IdMap, ObjectLedger
from clinical_crm.engine.ledger.triage import Triage
from clinical_crm.engine.ledger.views import Views


class Ledger(Runs, Records, Quarantine, Deletions, Reconciliation, Views, Triage):
    def __init__(self, url: str | None = None):
        self.url = url or settings.ledger_url()
        self.engine = _engine(self.url)

    def scope(self, connection: str, direction: str, object_name: str) -> ObjectLedger:
        """The ledger of one source object of a connection's flow (the engine's API)."""
        return ObjectLedger(self, connection, direction, object_name)

    def id_map(self, connection: str, target_object: str) -> IdMap:
        """The id map of one target object of a connection."""
        return IdMap(self, connection, target_object)
