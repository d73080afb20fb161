"""Quarantine triage: `quarantine_actions`, the decisions data engineers take on the page about a
quarantined record ("retry" in the next run, "ignore" with a reason), with the Airflow user.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from clinical_crm.engine.ledger import quarantine_actions

    quarantine_actions.create(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    op.drop_table("quarantine_actions")
