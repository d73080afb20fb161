"""Airflow DAGs of the Clinical Operations to Medical CRM connection: one per flow per connection file.

Thin on purpose: the DAGs are built by clinical_crm.airflow.dag_factory (one per flow) from include/connections/*.yaml
(or $CLINICAL_CRM_CONNECTIONS_DIR). Adding a connection = adding a YAML file. (The words
"airflow" and "dag" in this file also let Airflow's safe-mode discovery parse it.)
"""
from clinical_crm.airflow.dag_factory import build_dags

globals().update(build_dags())
