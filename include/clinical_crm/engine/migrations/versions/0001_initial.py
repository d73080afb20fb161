"""The ledger as it was before Alembic: runs, record_outcomes, quarantine, id_map, dq_summaries,
source_versions. Creates only the tables that are missing, so a ledger made by earlier code is
taken over in place; drops the old id_map index on connection alone (see ledger.id_map).

Revision ID: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLES = ("runs", "record_outcomes", "quarantine", "id_map", "dq_summaries", "source_versions")


def upgrade() -> None:
    from clinical_crm.engine.ledger import metadata

    bind = op.get_bind()
    # these six tables are unchanged since: their current definitions are the original ones
    metadata.create_all(bind, tables=[metadata.tables[name] for name in TABLES], checkfirst=True)
    if "ix_id_map_connection" in {index["name"] for index in sa.inspect(bind).get_indexes("id_map")}:
        op.drop_index("ix_id_map_connection", table_name="id_map")


def downgrade() -> None:
    raise NotImplementedError("the first revision is not undone")
