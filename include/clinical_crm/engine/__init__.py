"""Runs any Flow: typed hand-offs (RunContext, Staged), windows, staging, the quality gate
(Great Expectations), the load, and the ledger (with its Alembic migrations). No Airflow here:
clinical_crm.airflow wires these steps into tasks."""
