"""The deletion queue: deleted source records whose target record gets its deletion mark once.
Marks already written by earlier code (outcome marked_deleted) are entered as applied, so a
backfill of those windows does not mark them again.

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from clinical_crm.engine.ledger import deletion_queue

    bind = op.get_bind()
    deletion_queue.create(bind, checkfirst=True)
    op.execute(
        "INSERT INTO deletion_queue (connection, direction, object, source_id, state, attempts, first_seen, "
        "updated_at, run_id) "
        "SELECT connection, direction, object, source_id, 'applied', 0, MIN(at), MAX(at), MAX(run_id) "
        "FROM record_outcomes WHERE outcome = 'marked_deleted' GROUP BY connection, direction, object, source_id")


def downgrade() -> None:
    op.drop_table("deletion_queue")
