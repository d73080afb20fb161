"""Builds one DAG per flow per connection file: `<flow>__<name>` (ctms_to_crm__demo, ...).

Each DAG is built from its Flow (clinical_crm.flows): the same thin TaskFlow tasks for every
flow, each calling one step of clinical_crm.engine.runner. Parsing stays fast: no API calls,
and pandas / pyarrow / GX / the client are imported inside the tasks, never at module level.

    python -m clinical_crm.airflow.dag_factory pools    # create the per-vault pools (--slots N)
"""
from __future__ import annotations

import contextlib
import logging
import os
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, CronDataIntervalTimetable, ExceptionRetryPolicy, Param, RetryAction, RetryRule, task

from clinical_crm.airflow import assets, lineage, naming, notifier
from clinical_crm.flows import build as build_flow, build_all
from clinical_crm.flows.base import Flow

log = logging.getLogger(__name__)

DEFAULT_POOL_SLOTS = 8  # two runs on one vault, each with the default load.concurrency (4)

# Retrying cannot fix a wrong password, a missing permission, a bad configuration file or a
# window whose data fails the quality threshold: fail those at once, retry everything else.
FAIL_FAST = ExceptionRetryPolicy(rules=[
    RetryRule(exception=["clinical_crm.vault.errors.VaultAuthenticationError",
                         "clinical_crm.vault.errors.VaultPermissionError",
                         "clinical_crm.errors.ConfigError",
                         "clinical_crm.errors.QualityThresholdExceeded"],
              action=RetryAction.FAIL, reason="not retryable: fix the credentials, permissions, "
                                               "configuration or data, then re-run"),
])

TASK_DEFAULTS = {
    "owner": "clinical-crm",
    # a bound on every task: the client ends each call within its deadline, and a task that is
    # still running after this is failed (and retried) instead of holding its pool for hours
    "execution_timeout": timedelta(hours=2),
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
                        description="Manual runs: end of the window (ISO 8601, UTC). "
                                    "Empty: the data interval end, or now."),
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

    # a task takes `load.concurrency` slots: a pool smaller than that would never run it
    needed: dict[str, int] = {}
    for cfg in configs or config.load_connections():
        for conn_id in (cfg.ctms_conn_id, cfg.crm_conn_id):
            name = pool_name(conn_id)
            needed[name] = max(needed.get(name, slots), cfg.load.concurrency)
    for name, size in sorted(needed.items()):
        pool = Pool.get_pool(name)
        if pool is None or pool.slots < size:
            if pool is not None:
                log.warning("pool %s has %d slots, fewer than a connection's load.concurrency: now %d", name,
                            pool.slots, size)
            Pool.create_or_update_pool(name, size, "Concurrent calls to one vault (Clinical CRM connection)",
                                       include_deferred=False)
    return sorted(needed)


# ---------------------------------------------------------------- run-time helpers


def _config(source_file: str):
    """The configuration as it is now (re-read at run time: an admin may have deactivated it)."""
    from clinical_crm import config

    return config.load_connection(source_file)


@contextlib.contextmanager
def _step(ctx_xcom: dict | None):
    """A failing step marks the run failed in the ledger before Airflow sees the error."""
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext

    try:
        yield
    except BaseException as error:
        with contextlib.suppress(Exception):
            runner.fail(RunContext.from_xcom(ctx_xcom) if ctx_xcom else None, error)
        raise


@contextlib.contextmanager
def _clients(flow: Flow, cfg, *sides: str, run: dict | None = None):
    """Vault clients of the given sides ("ctms", "crm"), closed after the step. With two sides
    both sessions are opened, and ended, side by side (a login takes a round trip to each vault);
    an inactive configuration opens none (a client opens its session on its first call). `run`
    (the run's context): time waited for Vault maintenance is added to its ledger counts."""
    from concurrent.futures import ThreadPoolExecutor

    from clinical_crm.airflow.hooks import VaultHook

    clients: dict[str, Any] = {}

    def side_by_side(action) -> None:
        with ThreadPoolExecutor(max(1, len(clients))) as pool:
            list(pool.map(action, clients.values()))

    try:
        for side in sides:
            clients[side] = VaultHook(flow.conn_id(side), connection=cfg.name).get_client()
        if cfg.active and len(clients) > 1:
            side_by_side(lambda client: client.authenticate())
        yield clients
    finally:
        for side, client in clients.items():
            with contextlib.suppress(Exception):  # a log line never keeps a session open
                _log_vault_time(side, client)
        with contextlib.suppress(Exception):
            _record_maintenance(run, clients)
        side_by_side(lambda client: client.close())


MAINTENANCE = "vault maintenance"  # the key of a run's counts that says it waited (the page shows it)


def _record_maintenance(run: dict | None, clients: dict) -> None:
    """Maintenance windows the clients waited for, added to the run's ledger counts."""
    waits = sum(c.counters["maintenance_waits"] for c in clients.values())
    if not run or not waits:
        return
    from clinical_crm.engine.context import RunContext
    from clinical_crm.engine.ledger import Ledger

    ctx, ledger = RunContext.from_xcom(run), Ledger()
    counts = ledger.run(ctx.run_id)["counts"] or {}
    waited = counts.get(MAINTENANCE) or {}
    counts[MAINTENANCE] = {"windows": waited.get("windows", 0) + waits,
                           "waited_seconds": round(waited.get("waited_seconds", 0)
                                                   + sum(c.counters["maintenance_seconds"] for c in clients.values()))}
    ledger.set_counts(ctx.run_id, counts)


def _log_vault_time(side: str, client) -> None:
    """How much of the task went to waiting on the vault (the answer to "why was it slow?")."""
    c = client.counters
    calls = sum(v for k, v in c.items() if k.startswith("calls."))
    if calls:
        log.info("%s vault: %d calls, %.1f s waiting for answers, %.1f s in backoff and pacing "
                 "(%d retries, %d re-authentications, %d burst-delayed answers)", side, calls,
                 c["wait_seconds"], c["sleep_seconds"], c["retry"], c["reauth"], c["delayed_responses"])
    if c["maintenance_waits"]:
        log.warning("%s vault: waited %.0f s for Vault maintenance (%d announced windows)", side,
                    c["maintenance_seconds"], c["maintenance_waits"])


def _doc(flow: Flow, cfg) -> str:
    return f"""### Clinical Operations to Medical CRM: `{cfg.name}` ({flow.name})

{flow.description}

{cfg.description}

* Configuration: `{cfg.source_file}` (re-read at every run; `active: false` moves nothing)
* Vaults: CTMS `{cfg.ctms_conn_id}`, CRM `{cfg.crm_conn_id}`
  (pools `{pool_name(cfg.ctms_conn_id)}`, `{pool_name(cfg.crm_conn_id)}`)
* Window: from the end of the last successful window minus {cfg.lookback_minutes} min to the run's
  data interval end; manual runs may set params `window_start` / `window_end`.
* Steps: {"pre-step -> " if flow.pre_step else ""}extract -> validate (Great Expectations; failing rows
  quarantined) -> transform -> load; every run is recorded in the ledger with counts and its
  Data Docs report. See docs/pipeline.md.
"""


def _dag(flow: Flow, cfg) -> DAG:
    return DAG(
        dag_id=naming.dag_id(flow.name, cfg.name),
        description=f"{cfg.name}: {flow.name.replace('_', ' ')}",
        doc_md=_doc(flow, cfg),
        schedule=CronDataIntervalTimetable(cfg.schedule.cron, timezone="UTC"),
        start_date=cfg.schedule.start_date,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=not cfg.active,
        params=PARAMS,
        default_args=notifier.with_alerts(task_defaults(), cfg),
        tags=["clinical-crm", cfg.name, flow.name],
        owner_links={},
    )


# ---------------------------------------------------------------- tasks
# Module-level TaskFlow tasks, the same for every flow: `source` is the connection file,
# re-read at run time; `flow_name` names the flow; hand-offs travel as the steps' XCom dicts,
# each one XCom (`multiple_outputs=False`: a `-> dict` task would also push every key apart).


@task(multiple_outputs=False)
def begin(source: str, flow_name: str, **context) -> dict:
    from clinical_crm.engine import runner

    dag_run = context.get("dag_run")
    manual = dag_run is not None and str(getattr(dag_run, "run_type", "")).lower().endswith("manual")
    cfg = _config(source)
    from clinical_crm.vault.reference import run_prefix

    ctx = runner.begin(build_flow(flow_name, cfg), cfg, context["run_id"], context.get("data_interval_start"),
                       context.get("data_interval_end"), dict(context.get("params") or {}),
                       triggered_at=context.get("logical_date") if manual else None,
                       reference_prefix=run_prefix(cfg.name, context["ti"].dag_id, context["run_id"]))
    notifier.check_begin(cfg, ctx, context)
    return ctx.to_xcom()


@task(multiple_outputs=False)
def pre_step(source: str, flow_name: str, run: dict) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext

    with _step(run):
        cfg, ctx = _config(source), RunContext.from_xcom(run)
        flow = build_flow(flow_name, cfg)
        with _clients(flow, cfg, flow.source_side, run=run) as clients:
            ids = runner.pre_step(flow, cfg, ctx, clients).to_xcom()
        lineage.report([], lineage.staged_urls(ids))
        return ids


@task(multiple_outputs=False)
def extract(source: str, flow_name: str, run: dict, pre: dict | None = None) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext, Staged

    with _step(run):
        cfg, ctx = _config(source), RunContext.from_xcom(run)
        flow = build_flow(flow_name, cfg)
        with _clients(flow, cfg, "ctms", "crm", run=run) as clients:
            staged = runner.extract(flow, cfg, ctx, clients, Staged.from_xcom(pre)).to_xcom()
        lineage.report(assets.source_uris(flow, cfg) + lineage.staged_urls(pre), lineage.staged_urls(staged))
        return staged


@task(multiple_outputs=False)
def validate(source: str, flow_name: str, run: dict, staged: dict) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext, Staged

    with _step(run):
        cfg = _config(source)
        valid = runner.validate(build_flow(flow_name, cfg), cfg, RunContext.from_xcom(run),
                                Staged.from_xcom(staged)).to_xcom()
        lineage.report(lineage.staged_urls(staged), lineage.staged_urls(valid) + lineage.quarantine_urls(run))
        return valid


@task(multiple_outputs=False)
def transform(source: str, flow_name: str, run: dict, staged: dict, validated: dict) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext, Staged

    with _step(run):
        cfg = _config(source)
        records = runner.transform(build_flow(flow_name, cfg), cfg, RunContext.from_xcom(run),
                                   Staged.from_xcom(staged), Staged.from_xcom(validated)).to_xcom()
        lineage.report(lineage.staged_urls(staged, validated), lineage.staged_urls(records))
        return records


@task(multiple_outputs=False)
def load(source: str, flow_name: str, run: dict, staged: dict, records: dict, **context) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext, Staged

    ti = context.get("ti")
    final_attempt = ti is None or ti.try_number > ti.max_tries  # no Airflow retry is left after this one
    with _step(run):
        cfg, ctx = _config(source), RunContext.from_xcom(run)
        flow = build_flow(flow_name, cfg)
        with _clients(flow, cfg, flow.target_side, run=run) as clients:
            counts = runner.load(flow, cfg, ctx, clients[flow.target_side], Staged.from_xcom(staged),
                                 Staged.from_xcom(records), final_attempt=final_attempt)
        extras = assets.event_extras(flow, cfg, ctx, counts)
        for uri, extra in extras.items():  # this task's outlets
            context["outlet_events"][assets.Asset(uri)].extra = extra
        lineage.report(lineage.staged_urls(records), list(extras))
        return counts


@task(multiple_outputs=False)
def finish(source: str, run: dict, loaded: dict, **context) -> dict:
    from clinical_crm.engine import runner
    from clinical_crm.engine.context import RunContext

    ctx = RunContext.from_xcom(run)
    result = runner.finish(ctx)
    notifier.check_finish(_config(source), ctx, context)
    return result


# ---------------------------------------------------------------- the DAGs


def build_dag(flow: Flow, cfg) -> DAG:
    """begin -> [pre-step] -> extract -> validate -> transform -> load -> finish. Reads run in the
    source vault's pool, writes in the target's; extract and load keep `load.concurrency` calls in
    flight, so they take that many slots."""
    source = str(cfg.source_file)
    read_pool = pool_name(flow.conn_id(flow.source_side))
    write_pool = pool_name(flow.conn_id(flow.target_side))
    calls = cfg.load.concurrency
    with _dag(flow, cfg) as dag:
        # each XComArg (typed Any) stands for the XCom dict its task returns, which the next task takes
        run: Any = begin.override(pool=read_pool)(source, flow.name)
        # the pre-step's task only where this connection file enables it (one task less to run)
        pre: Any = pre_step.override(task_id=flow.pre_step.task_id, pool=read_pool)(source, flow.name, run) \
            if flow.pre_step else None
        staged: Any = extract.override(pool=read_pool, pool_slots=calls)(source, flow.name, run, pre)
        validated: Any = validate(source, flow.name, run, staged)
        records: Any = transform(source, flow.name, run, staged, validated)
        loaded: Any = load.override(pool=write_pool, pool_slots=calls, outlets=assets.target_assets(flow, cfg))(
            source, flow.name, run, staged, records)
        finish(source, run, loaded)
    return dag


# ---------------------------------------------------------------- reconciliation


@task(multiple_outputs=False)
def reconcile(source: str, flow_name: str, **context) -> dict:
    """Compare the target with what the source says it should hold (engine/reconcile.py); repair
    when the param `repair` (or else the file's `reconcile.repair`) says so."""
    from clinical_crm.engine import reconcile as reconciliation

    cfg = _config(source)
    flow = build_flow(flow_name, cfg)
    if not cfg.active:
        log.warning("connection %s is inactive: reconciliation reads and writes nothing", cfg.name)
        return {}
    repair = (context.get("params") or {}).get("repair")
    with _clients(flow, cfg, "ctms", "crm") as clients:
        return reconciliation.reconcile(flow, cfg, clients, context["run_id"],
                                        cfg.reconcile.repair if repair is None else bool(repair))


def build_reconcile_dag(cfg) -> DAG:
    """`reconcile__<name>`: one task per flow (in the target vault's pool), on the cron of the
    file's `reconcile` key (daily by default); manual runs may set the param `repair`."""
    from airflow.sdk import CronTriggerTimetable

    with DAG(
        dag_id=naming.reconcile_dag_id(cfg.name),
        description=f"{cfg.name}: reconciliation of both directions",
        doc_md=f"""### Reconciliation of `{cfg.name}`

Reads every source record and every target record of each flow, computes what the target should
hold by the flows' rules, and records each drift (missing, stale, extra, missing deletion mark)
in the ledger; with `repair` (param, else `reconcile.repair` in `{cfg.source_file}`:
{cfg.reconcile.repair}) re-sends the newest version. See docs/pipeline.md, "Reconciliation".
""",
        schedule=CronTriggerTimetable(cfg.reconcile.cron, timezone="UTC"),
        start_date=cfg.schedule.start_date,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=not cfg.active,
        params={"repair": Param(None, type=["null", "boolean"],
                                description="Re-send what drifted. Empty: the file's reconcile.repair.")},
        default_args=notifier.with_alerts(task_defaults(), cfg),  # a failed reconciliation alerts too
        tags=["clinical-crm", cfg.name, "reconcile"],
    ) as dag:
        for flow in build_all(cfg):
            reconcile.override(task_id=naming.reconcile_task_id(flow.name),
                               pool=pool_name(flow.conn_id(flow.target_side)))(str(cfg.source_file), flow.name)
    return dag


# ---------------------------------------------------------------- housekeeping


@task(multiple_outputs=False)
def housekeeping(source: str) -> dict:
    """Apply the file's `retention:` (engine/housekeeping.py); logs and returns what it removed."""
    from clinical_crm.engine import housekeeping as keeping

    return keeping.housekeep(_config(source))


def build_housekeeping_dag(cfg) -> DAG:
    """`housekeeping__<name>`: one task, on the cron of `retention.cron` (daily by default), in no
    vault's pool (it calls no vault); paused on creation with the connection's other DAGs."""
    from airflow.sdk import CronTriggerTimetable

    with DAG(
        dag_id=naming.housekeeping_dag_id(cfg.name),
        description=f"{cfg.name}: retention of its history (GX results, run files, outcomes, staging)",
        doc_md=f"""### Housekeeping of `{cfg.name}`

Applies `retention:` of `{cfg.source_file}` and logs what it removed; never what an open
quarantine row, a queued deletion mark, the id map or reconciliation needs. See
docs/operations.md, "Housekeeping".
""",
        schedule=CronTriggerTimetable(cfg.retention.cron, timezone="UTC"),
        start_date=cfg.schedule.start_date,
        catchup=False,
        max_active_runs=1,
        is_paused_upon_creation=not cfg.active,
        default_args=notifier.with_alerts(task_defaults(), cfg),  # a failed housekeeping alerts too
        tags=["clinical-crm", cfg.name, "housekeeping"],
    ) as dag:
        housekeeping(str(cfg.source_file))
    return dag


def build_dags(configs=None) -> dict[str, DAG]:
    """One DAG per flow per connection file, by dag_id (for a DAG file's globals())."""
    from clinical_crm import config

    dags = {}
    for cfg in configs if configs is not None else config.load_connections():
        for flow in build_all(cfg):
            dag = build_dag(flow, cfg)
            dags[dag.dag_id] = dag
        dags[naming.reconcile_dag_id(cfg.name)] = build_reconcile_dag(cfg)
        dags[naming.housekeeping_dag_id(cfg.name)] = build_housekeeping_dag(cfg)
    return dags


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clinical_crm.airflow.dag_factory")
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
