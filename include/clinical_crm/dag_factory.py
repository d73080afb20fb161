"""Builds the two DAGs of each connection: `ctms_to_crm__<name>` and `crm_to_ctms__<name>`.

Thin TaskFlow tasks that only call clinical_crm.pipeline. Parsing stays fast: no API calls, and
pandas / pyarrow / GX / the client are imported inside the tasks, never at module level.

    python -m clinical_crm.dag_factory pools    # create the per-vault pools (slots: --slots N)
"""
from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta

from airflow.sdk import DAG, CronDataIntervalTimetable, ExceptionRetryPolicy, Param, RetryAction, RetryRule, task

log = logging.getLogger(__name__)

CTMS_TO_CRM = "ctms_to_crm"
CRM_TO_CTMS = "crm_to_ctms"
DEFAULT_POOL_SLOTS = 4

# Retrying cannot fix a wrong password, a missing permission, a bad configuration file or a
# window whose data fails the quality threshold: fail those at once, retry everything else.
FAIL_FAST = ExceptionRetryPolicy(rules=[
    RetryRule(exception=["clinical_crm.errors.VaultAuthenticationError",
                         "clinical_crm.errors.VaultPermissionError",
                         "clinical_crm.errors.ConfigError",
                         "clinical_crm.quality_errors.QualityThresholdExceeded"],
              action=RetryAction.FAIL, reason="not retryable: fix the credentials, permissions, "
                                               "configuration or data, then re-run"),
])

TASK_DEFAULTS = {
    "owner": "clinical-crm",
    "retries": 3,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
    "retry_policy": FAIL_FAST,
}

PARAMS = {
    "window_start": Param(None, type=["null", "string"],
                          description="Manual runs: start of the window (ISO 8601, UTC). Empty: the rule."),
    "window_end": Param(None, type=["null", "string"],
                        description="Manual runs: end of the window (ISO 8601, UTC). Empty: the data interval end, or now."),
}


def task_defaults() -> dict:
    """TASK_DEFAULTS; the first retry's delay may be set in seconds with the environment variable
    CLINICAL_CRM_RETRY_DELAY_SECONDS (tests and scripts/fault_run.py use 1 so that dag.test(),
    which waits for it, does not wait minutes)."""
    delay = os.environ.get("CLINICAL_CRM_RETRY_DELAY_SECONDS")
    return {**TASK_DEFAULTS, "retry_delay": timedelta(seconds=float(delay))} if delay else dict(TASK_DEFAULTS)


def pool_name(conn_id: str) -> str:
    """One pool per vault, so API concurrency per vault is bounded: `vault_<conn_id>`."""
    return conn_id if conn_id.startswith("vault_") else f"vault_{conn_id}"


def create_pools(configs=None, slots: int = DEFAULT_POOL_SLOTS) -> list[str]:
    """Create (or keep) the pool of every vault of every connection; needs the Airflow metadata DB."""
    from airflow.models.pool import Pool

    from clinical_crm import config

    names = sorted({pool_name(c) for cfg in (configs or config.load_connections())
                    for c in (cfg.ctms_conn_id, cfg.crm_conn_id)})
    for name in names:
        if Pool.get_pool(name) is None:
            Pool.create_or_update_pool(name, slots, "Concurrent calls to one vault (Clinical CRM connection)",
                                       include_deferred=False)
    return names


# ---------------------------------------------------------------- run-time helpers


def _config(source_file: str):
    """The configuration as it is now (re-read at run time: an admin may have deactivated it)."""
    from clinical_crm import config

    return config.load_connection(source_file)


@contextlib.contextmanager
def _recording_failure(run: dict | None):
    """A failing step marks the run failed in the ledger before Airflow sees the error."""
    try:
        yield
    except BaseException as error:
        from clinical_crm import pipeline

        with contextlib.suppress(Exception):
            pipeline.fail(run, error)
        raise


@contextlib.contextmanager
def _client(conn_id: str):
    from clinical_crm.hooks import VaultHook

    client = VaultHook(conn_id).get_client()
    try:
        yield client
    finally:
        client.close()


def _doc(cfg, direction: str) -> str:
    if direction == CTMS_TO_CRM:
        what = ("Sends CTMS **Clinical Activities** as CRM *Vault Clinical Interactions*"
                + (", and **Studies / Study Sites** as CRM *Clinical Studies / Sites*" if cfg.features.studies_and_sites else "")
                + (". Monitoring Events and Study Communication Logs marked *Activity Update Required* "
                   "first get their Clinical Activity (automated activities)" if cfg.features.automated_activities else "")
                + ". Deleted activities get the subject suffix, deleted studies/sites the deleted status.")
    else:
        what = ("Receives CRM calls flagged *Send to Vault Clinical* as CTMS **Medical Activities**; "
                "deleted calls inactivate their Medical Activity.")
    return f"""### Clinical Operations to Medical CRM: `{cfg.name}` ({direction})

{what}

{cfg.description}

* Configuration: `{cfg.source_file}` (re-read at every run; `active: false` moves nothing)
* Vaults: CTMS `{cfg.ctms_conn_id}`, CRM `{cfg.crm_conn_id}` (pools `{pool_name(cfg.ctms_conn_id)}`, `{pool_name(cfg.crm_conn_id)}`)
* Window: from the end of the last successful window minus {cfg.lookback_minutes} min to the run's
  data interval end; manual runs may set params `window_start` / `window_end`.
* Steps: extract -> validate (Great Expectations; failing rows quarantined) -> transform -> load;
  every run is recorded in the ledger with counts and its Data Docs report. See docs/pipeline.md.
"""


def _dag(cfg, direction: str) -> DAG:
    return DAG(
        dag_id=f"{direction}__{cfg.name}",
        description=f"{cfg.name}: {direction.replace('_', ' ')}",
        doc_md=_doc(cfg, direction),
        schedule=CronDataIntervalTimetable(cfg.schedule.cron, timezone="UTC"),
        start_date=cfg.schedule.start_date,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=not cfg.active,
        params=PARAMS,
        default_args=task_defaults(),
        tags=["clinical-crm", cfg.name, direction],
        owner_links={},
    )


# ---------------------------------------------------------------- tasks
# Module-level TaskFlow tasks: `source` is the connection file, re-read at run time.


@task
def begin(source: str, direction: str, **context) -> dict:
    from clinical_crm import pipeline

    return pipeline.begin(_config(source), direction, context["run_id"],
                          context.get("data_interval_start"), context.get("data_interval_end"),
                          dict(context.get("params") or {}))


@task
def automate_activities(source: str, run: dict) -> dict:
    from clinical_crm import pipeline

    with _recording_failure(run):
        cfg = _config(source)
        if not (run["active"] and cfg.features.automated_activities):
            return {}
        with _client(cfg.ctms_conn_id) as ctms:
            return pipeline.automate(cfg, run, ctms)


@task
def extract(source: str, run: dict, automated: dict | None = None) -> dict:
    from clinical_crm import pipeline

    with _recording_failure(run):
        if not run["active"]:
            return {}
        cfg = _config(source)
        with _client(cfg.ctms_conn_id) as ctms, _client(cfg.crm_conn_id) as crm:
            if run["direction"] == CTMS_TO_CRM:
                return pipeline.extract_ctms_to_crm(cfg, run, ctms, crm, automated)
            return pipeline.extract_crm_to_ctms(cfg, run, ctms, crm)


@task
def validate(source: str, run: dict, staged: dict) -> dict:
    from clinical_crm import pipeline

    with _recording_failure(run):
        return pipeline.validate(_config(source), run, staged)


@task
def transform(source: str, run: dict, staged: dict, validated: dict) -> dict:
    from clinical_crm import pipeline

    with _recording_failure(run):
        return pipeline.transform(_config(source), run, staged, validated)


@task
def load(source: str, run: dict, staged: dict, records: dict) -> dict:
    from clinical_crm import pipeline

    with _recording_failure(run):
        if not run["active"]:
            return {}
        cfg = _config(source)
        if run["direction"] == CTMS_TO_CRM:
            with _client(cfg.crm_conn_id) as crm:
                return pipeline.load_ctms_to_crm(cfg, run, crm, staged, records)
        with _client(cfg.ctms_conn_id) as ctms:
            return pipeline.load_crm_to_ctms(cfg, run, ctms, staged, records)


@task
def finish(run: dict, loaded: dict) -> dict:
    from clinical_crm import pipeline

    return pipeline.finish(run)


# ---------------------------------------------------------------- the two DAGs


def build_ctms_to_crm(cfg) -> DAG:
    source = str(cfg.source_file)
    ctms_pool, crm_pool = pool_name(cfg.ctms_conn_id), pool_name(cfg.crm_conn_id)
    with _dag(cfg, CTMS_TO_CRM) as dag:
        run = begin.override(pool=ctms_pool)(source, CTMS_TO_CRM)
        automated = automate_activities.override(pool=ctms_pool)(source, run)
        staged = extract.override(pool=ctms_pool)(source, run, automated)
        records = transform(source, run, staged, validate(source, run, staged))
        finish(run, load.override(pool=crm_pool)(source, run, staged, records))
    return dag


def build_crm_to_ctms(cfg) -> DAG:
    source = str(cfg.source_file)
    ctms_pool, crm_pool = pool_name(cfg.ctms_conn_id), pool_name(cfg.crm_conn_id)
    with _dag(cfg, CRM_TO_CTMS) as dag:
        run = begin.override(pool=crm_pool)(source, CRM_TO_CTMS)
        staged = extract.override(pool=crm_pool)(source, run)
        records = transform(source, run, staged, validate(source, run, staged))
        finish(run, load.override(pool=ctms_pool)(source, run, staged, records))
    return dag


def build_dags(configs=None) -> dict[str, DAG]:
    """Both DAGs of every connection file, by dag_id (for a DAG file's globals())."""
    from clinical_crm import config

    dags = {}
    for cfg in configs if configs is not None else config.load_connections():
        for dag in (build_ctms_to_crm(cfg), build_crm_to_ctms(cfg)):
            dags[dag.dag_id] = dag
    return dags


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clinical_crm.dag_factory")
    sub = parser.add_subparsers(dest="command", required=True)
    pools = sub.add_parser("pools", help="create the per-vault pools of every connection file")
    pools.add_argument("--slots", type=int, default=DEFAULT_POOL_SLOTS)
    args = parser.parse_args(argv)
    if args.command == "pools":
        for name in create_pools(slots=args.slots):
            print(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
