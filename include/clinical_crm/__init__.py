"""Open Clinical Operations (CTMS) to Medical CRM connection, as Apache Airflow 3 DAGs."""
