# The project image: Apache Airflow 3.3.2 with the pinned requirements and the Clinical CRM package
# (DAG factory, UI plugin, Vault client) plus the Vault sandbox used by the demo vault services.
# The -python3.11 variant: requirements.txt is resolved for Python 3.11 and the project requires it
# (the plain 3.3.2 tag may carry another Python).
FROM apache/airflow:3.3.2-python3.11

# Pinned set first (cached while only the code changes). apache-airflow stays at the image's
# version: requirements.txt pins the same 3.3.2.
COPY --chown=airflow:root requirements.txt /opt/clinical-crm/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/clinical-crm/requirements.txt

COPY --chown=airflow:root pyproject.toml README.md /opt/clinical-crm/
COPY --chown=airflow:root include /opt/clinical-crm/include
COPY --chown=airflow:root scripts /opt/clinical-crm/scripts
# Editable, like the local setup: the package reads files next to its modules (templates, the
# sandbox's models and VQL grammar) straight from /opt/clinical-crm/include.
# The build leaves include/*.egg-info, a second copy of the project's metadata on sys.path: Airflow
# would then load the plugin twice and show "Plugin Import Error" on its home page. Remove it.
RUN pip install --no-cache-dir --no-deps -e /opt/clinical-crm \
    && rm -rf /opt/clinical-crm/include/*.egg-info

# DAG files and connection files are baked in (docker-compose.yaml mounts the working copy over them).
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root include/connections /opt/airflow/connections

# Owned by the airflow user so named volumes mounted here inherit that ownership.
RUN mkdir -p /opt/airflow/data/sandbox /opt/airflow/data/reports /opt/airflow/config

ENV CLINICAL_CRM_DATA_DIR=/opt/airflow/data \
    CLINICAL_CRM_CONNECTIONS_DIR=/opt/airflow/connections
