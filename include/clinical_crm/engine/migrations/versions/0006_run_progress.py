"""runs.progress: the latest progress of a running run's long step (records done of total, rate,
elapsed, ETA, calls left in the burst window), written at a steady pace while it runs, so the page
can show a run in progress. Nullable: finished runs and runs recorded before have none.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates `runs` from the current table definition, so a new ledger has the column already
    if "progress" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("runs")}:
        op.add_column("runs", sa.Column("progress", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("progress")
