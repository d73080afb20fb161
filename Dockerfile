# The project image: Apache Airflow 3.3.2 with the runtime pins (requirements.txt: no test tool)
# and the Clinical CRM package (DAG factory, UI plugin, Vault client, the Vault sandbox used by the
# demo vault services), installed as a wheel: no source tree on sys.path.
# The -python3.11 variant: requirements.txt is resolved for Python 3.11 and the project requires it
# (the plain 3.3.2 tag may carry another Python).

# Stage 1: the project's wheel (its templates, sandbox models, VQL grammar and migrations inside).
FROM apache/airflow:3.3.2-python3.11 AS wheel
COPY --chown=airflow:root pyproject.toml README.md /home/airflow/src/
COPY --chown=airflow:root include /home/airflow/src/include
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /home/airflow/wheels /home/airflow/src

FROM apache/airflow:3.3.2-python3.11

# Runtime pins first (cached while only the code changes). apache-airflow stays at the image's
# version: requirements.txt pins the same 3.3.2. pip check: the pins and what the base image
# already holds must agree, or the build fails here rather than a task at run time.
COPY --chown=airflow:root requirements.txt /opt/clinical-crm/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /opt/clinical-crm/requirements.txt \
    && pip check

# Not editable and without its dependencies (all pinned above).
COPY --from=wheel /home/airflow/wheels /tmp/wheels
RUN pip install --no-cache-dir --no-deps /tmp/wheels/*.whl && pip check

# The init script of docker-compose's airflow-init service.
COPY --chown=airflow:root scripts/airflow_init.sh /opt/clinical-crm/scripts/airflow_init.sh

# DAG files and connection files are baked in (docker-compose.yaml mounts the working copy over them).
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root include/connections /opt/airflow/connections

# Owned by the airflow user so named volumes mounted here inherit that ownership.
RUN mkdir -p /opt/airflow/data/sandbox /opt/airflow/data/reports /opt/airflow/config

ENV CLINICAL_CRM_DATA_DIR=/opt/airflow/data \
    CLINICAL_CRM_CONNECTIONS_DIR=/opt/airflow/connections
