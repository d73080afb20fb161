"""Reconciliation: `reconcile_runs` (one row per flow per reconcile run, with its summary) and
`drift` (every record found different from what its source says, with repaired_at).

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from clinical_crm.engine.ledger import drift, reconcile_runs

    bind = op.get_bind()
    reconcile_runs.create(bind, checkfirst=True)
    drift.create(bind, checkfirst=True)


def downgrade() -> None:
    op.drop_table("drift")
    op.drop_table("reconcile_runs")
