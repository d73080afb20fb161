"""Alembic environment of the ledger: runs on the connection `upgrade()` hands over."""
from alembic import context

from clinical_crm.engine.ledger import metadata
from clinical_crm.engine.migrations import VERSION_TABLE

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata,
                  version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
