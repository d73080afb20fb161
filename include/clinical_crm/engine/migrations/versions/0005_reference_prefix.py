"""runs.reference_prefix: the start of the X-VaultAPI-ReferenceID of every Vault call of the run
(vault/reference.py), so an admin can match Vault's API usage log to the run. Nullable: runs
recorded before have none.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # 0001 creates `runs` from the current table definition, so a new ledger has the column already
    if "reference_prefix" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("runs")}:
        op.add_column("runs", sa.Column("reference_prefix", sa.String(100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reference_prefix")
