"""Indexes for the hot queries, so that a run's and the page's cost does not grow with history
(issue 20): every query a run or the page makes on a table that grows with every run reads a
range of an index that ends at what it needs (the newest rows, the open ones, the pending ones),
never all the rows of a connection.

- runs (connection, id): the page's latest runs of a connection, the last run;
- runs (connection, direction, window_end): the end of the last completed window (where the
  next run starts; the page's health line), read backwards from the newest;
- runs (connection, direction, dag_run_id): a run's own row (start_run, a retried begin);
- quarantine (connection, direction, object, resolved_at): the open ids a run reads again;
- quarantine (connection, resolved_at, id): the page's open quarantine, oldest first, paged;
- quarantine (connection, resolved_at, object): the triage filter's objects of the open rows;
- deletion_queue (connection, direction, object, state): the pending deletion marks of a run;
- drift (connection, id) and reconcile_runs (connection, id): the page's latest of each.
- record_outcomes (connection, object, source_id) of `quarantined` outcomes only (a partial
  index, small): a run's known open quarantine items (accepted_quarantine_ids) and
  housekeeping's check of them, without reading every outcome.

Created only where missing (a ledger made from the current table definitions by an earlier
revision may have some), dropped on downgrade.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEXES = {
    "ix_runs_connection_id": ("runs", ["connection", "id"]),
    "ix_runs_connection_direction_window_end": ("runs", ["connection", "direction", "window_end"]),
    "ix_runs_connection_direction_dag_run_id": ("runs", ["connection", "direction", "dag_run_id"]),
    "ix_quarantine_scope_open": ("quarantine", ["connection", "direction", "object", "resolved_at"]),
    "ix_quarantine_connection_open_id": ("quarantine", ["connection", "resolved_at", "id"]),
    "ix_quarantine_connection_open_object": ("quarantine", ["connection", "resolved_at", "object"]),
    "ix_deletion_queue_scope_state": ("deletion_queue", ["connection", "direction", "object", "state"]),
    "ix_drift_connection_id": ("drift", ["connection", "id"]),
    "ix_reconcile_runs_connection_id": ("reconcile_runs", ["connection", "id"]),
}


QUARANTINED = "ix_record_outcomes_quarantined"
QUARANTINED_WHERE = sa.text("outcome = 'quarantined'")


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, (table, columns) in INDEXES.items():
        if name not in {index["name"] for index in inspector.get_indexes(table)}:
            op.create_index(name, table, columns)
    if QUARANTINED not in {index["name"] for index in inspector.get_indexes("record_outcomes")}:
        op.create_index(QUARANTINED, "record_outcomes", ["connection", "object", "source_id"],
                        postgresql_where=QUARANTINED_WHERE, sqlite_where=QUARANTINED_WHERE)


def downgrade() -> None:
    op.drop_index(QUARANTINED, table_name="record_outcomes")
    for name, (table, _columns) in INDEXES.items():
        op.drop_index(name, table_name=table)
