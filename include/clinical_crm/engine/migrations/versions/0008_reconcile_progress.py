"""reconcile_runs.progress: the latest progress of a running reconciliation's long steps (its
reads, validation, comparison and repair: records done of total, rate, elapsed, ETA, calls left in
the burst window), as runs.progress (0006) for the connection's runs, so the page can show a
reconciliation in progress. Nullable: reconciliations recorded before have none.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0004 creates `reconcile_runs` from the current table definition, so a new ledger has the column already
    if "progress" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("reconcile_runs")}:
        op.add_column("reconcile_runs", sa.Column("progress", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reconcile_runs") as batch:
        batch.drop_column("progress")
