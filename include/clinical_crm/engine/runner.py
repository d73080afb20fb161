"""The one runner: executes any Flow step by step, recording everything in the ledger.

    begin -> [pre-step] -> extract -> validate -> transform -> load -> finish

Each step takes the `RunContext` made by `begin` and the `Staged` files of earlier steps, and
returns the same small typed values, so XCom carries paths and counts only. Nothing here names
a direction: the Flow says what to read, check, map, write and mark deleted. An inactive
configuration moves nothing: every step after `begin` then returns at once (`_active`).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from clinical_crm.engine import staging, windows
from clinical_crm.engine.context import RunContext, Staged
from clinical_crm.engine.ledger import Ledger
from clinical_crm.flows.base import VALID, Flow

log = logging.getLogger(__name__)

# What the load writes for a record (a retried load clears them first: one outcome per record),
# except marked_deleted: a mark written is never written again (the deletion queue), so its
# outcome stays with the attempt that wrote it
LOAD_OUTCOMES = ["created", "updated", "unchanged", "failed", "marked_deleted", "superseded", "unknown"]
CLEARED_ON_RETRY = [o for o in LOAD_OUTCOMES if o != "marked_deleted"]
PRE_STEP_IDS = "pre_step_ids"
# Per-record errors a later attempt can clear (the client already re-sent these records a few
# times): the load task fails after writing everything else, so Airflow retries it; the upserts
# by external id and the deletion queue make the retry safe.
TRANSIENT_RECORD_ERRORS = ("RACE_CONDITION", "UNEXPECTED_ERROR")


def _active(empty):
    """Steps after begin: nothing to do (and `empty` returned) when the configuration is inactive."""
    def wrap(step):
        @functools.wraps(step)
        def run(flow, cfg, ctx, *args, **kwargs):
            return step(flow, cfg, ctx, *args, **kwargs) if ctx.active else empty()
        return run
    return wrap


# ---------------------------------------------------------------- begin / finish


def begin(flow: Flow, cfg, dag_run_id: str, data_interval_start: datetime | None,
          data_interval_end: datetime | None, params: dict | None = None, ledger: Ledger | None = None,
          triggered_at: datetime | None = None, reference_prefix: str | None = None) -> RunContext:
    """Decide the run's window and open its ledger row. `triggered_at`: a manual run's logical
    date (the moment it was triggered for), which its window reaches (see windows.run_window);
    `reference_prefix`: what every Vault call of the run starts its X-VaultAPI-ReferenceID with."""
    ledger = ledger or Ledger()
    params = params or {}
    # Before the first success the schedule's start date stands for "the end of the last
    # successful window": the first run (catchup is off) then sends everything since the start
    # date instead of skipping it.
    last_success = ledger.last_success_end(cfg.name, flow.name) or cfg.schedule.start_date
    window = windows.run_window(
        data_interval_start, data_interval_end, last_success,
        cfg.lookback_minutes, window_start=params.get("window_start"), window_end=params.get("window_end"),
        first_start=cfg.schedule.start_date, triggered_at=triggered_at)
    state = "running" if cfg.active else "inactive"
    run_id = ledger.start_run(cfg.name, flow.name, dag_run_id, window.start, window.end, state=state,
                              reference_prefix=reference_prefix)
    ctx = RunContext(cfg.name, flow.name, dag_run_id, window.start.isoformat(), window.end.isoformat(), cfg.active,
                     staging.run_dir(cfg.name, flow.name, dag_run_id), run_id)
    if not cfg.active:
        ledger.finish_run(run_id, "inactive", counts={}, message="configuration is inactive: nothing was moved")
        log.warning("connection %s is inactive (active: false in %s): this run moves nothing", cfg.name, cfg.source_file)
    else:
        log.info("%s %s covers %s .. %s (ledger run %s)", cfg.name, flow.name, ctx.window_start, ctx.window_end, run_id)
    return ctx


def add_counts(ledger: Ledger, ctx: RunContext, counts: dict[str, dict], dq_report: str | None = None) -> dict:
    """Merge per-object counts into the run's ledger row."""
    current = ledger.run(ctx.run_id)["counts"] or {}
    for obj, values in counts.items():
        current[obj] = {**current.get(obj, {}), **values}
    ledger.set_counts(ctx.run_id, current, dq_report)
    return current


def fail(ctx: RunContext | None, error: BaseException, ledger: Ledger | None = None) -> None:
    """Mark the run failed in the ledger (a later success of a retry overrides it)."""
    if ctx is not None and ctx.run_id:
        (ledger or Ledger()).finish_run(ctx.run_id, "failed", message=f"{type(error).__name__}: {error}")


def finish(ctx: RunContext, ledger: Ledger | None = None) -> dict:
    """Close the run: `success`, or `partial` when deletion marks the target refused are left in
    the deletion queue (every later run tries them again; the ledger and the page say which)."""
    ledger = ledger or Ledger()
    if not ctx.active:
        return ledger.run(ctx.run_id)
    left = {obj: c["deletions_failed"] for obj, c in (ledger.run(ctx.run_id)["counts"] or {}).items()
            if isinstance(c, dict) and c.get("deletions_failed")}
    if left:
        ledger.finish_run(ctx.run_id, "partial", message=f"deletion marks refused by the target vault, still queued "
                          f"and tried again by every later run: {left}")
        log.warning("run %s: deletion marks not applied, still queued: %s", ctx.run_id, left)
    else:
        ledger.finish_run(ctx.run_id, "success", message="")
    staging.remove_run(ctx.run_dir)
    result = ledger.run(ctx.run_id)
    log.info("run %s finished: %s", ctx.run_id, result["counts"])
    return result


# ---------------------------------------------------------------- pre-step / extract


def pre_step_enabled(flow: Flow, cfg) -> bool:
    return flow.pre_step is not None and flow.pre_step.enabled(cfg)


@_active(Staged)
def pre_step(flow: Flow, cfg, ctx: RunContext, clients: dict, ledger: Ledger | None = None) -> Staged:
    """The flow's pre-step (e.g. automated activities); stages the ids extraction must read."""
    import pandas as pd

    ledger = ledger or Ledger()
    ids: list[str] = []
    if pre_step_enabled(flow, cfg):
        ids, counts = flow.pre_step.run(cfg, clients[flow.source_side], ledger, ctx)
        add_counts(ledger, ctx, counts)
    return Staged({PRE_STEP_IDS: staging.write_frames(f"{ctx.run_dir}/{PRE_STEP_IDS}.parquet",
                                                      [pd.DataFrame({"id": ids})], ["id"])})


@_active(Staged)
def extract(flow: Flow, cfg, ctx: RunContext, clients: dict, pre: Staged | None = None,
            ledger: Ledger | None = None) -> Staged:
    """Stage what the flow reads; records quarantined before and those the pre-step wrote are
    read again by id whatever their modification time."""
    from clinical_crm.engine.extract import staged_values

    ledger = ledger or Ledger()
    reread = ledger.quarantined_ids(cfg.name, flow.name, flow.validation.source_object(cfg))
    if pre is not None and PRE_STEP_IDS in pre:
        reread += staged_values(pre[PRE_STEP_IDS], "id")
    staged = Staged(flow.extraction.stage(cfg, clients, ctx.window, ctx.run_dir, reread, ledger))
    counts: dict[str, dict] = {}
    for name, (obj, key) in flow.extraction.counts(cfg).items():
        if name in staged:
            counts.setdefault(obj, {})[key] = staged.rows(name)
    add_counts(ledger, ctx, counts)
    log.info("extracted %s", {name: f.rows for name, f in staged.files.items()})
    return staged


# ---------------------------------------------------------------- validate


@_active(Staged)
def validate(flow: Flow, cfg, ctx: RunContext, staged: Staged, ledger: Ledger | None = None) -> Staged:
    """Run the GX suites, quarantine failing rows with reasons, stage the good rows (VALID).

    Raises QualityThresholdExceeded (after recording everything) when too many rows fail.
    """
    from clinical_crm.engine import quality
    from clinical_crm.engine.quarantine_report import QuarantineReport

    ledger = ledger or Ledger()
    v = flow.validation
    object_name = v.source_object(cfg)
    rules = v.rules(cfg)
    reference = v.reference(staged, cfg)
    validator = quality.Validator(cfg.name, ctx.dag_run_id, matched_columns=(v.matched_column,))
    good = staging.FrameWriter(f"{ctx.run_dir}/{v.source}.valid.parquet")
    rows = failing = 0
    # Records quarantined by earlier runs are re-checked every run (held_before). While they still
    # fail, those a successful run already accepted are known open items, not new defects of this
    # window: the failing share that can fail the run counts the other rows only.
    held_before = set(ledger.quarantined_ids(cfg.name, flow.name, object_name))
    accepted = ledger.accepted_quarantine_ids(cfg.name, flow.name, object_name)
    new_rows = new_failing = 0
    reason_counts: dict[str, int] = {}
    suites: list[dict] = []
    seen = staging.IdSet()
    quarantine = QuarantineReport(cfg.name, flow.name, ctx.dag_run_id)
    ledger.clear_outcomes(ctx.run_id, object_name, only=["quarantined", "source_deleted"])  # a retry starts over
    quality.import_gx()
    with _frozen_heap():
        for chunk in staging.read_chunks(staged.path(v.source)):
            # a quarantined record may also have changed in the window: keep one copy
            chunk = chunk[~seen.isin(chunk["id"])].drop_duplicates("id", keep="last")
            seen.add(chunk["id"])
            if chunk.empty:
                continue
            checks = v.checks(chunk, reference, cfg)
            suites += validator.validate(object_name, checks, rules)
            findings, per_rule = quality.row_findings(checks, rules)
            reasons = findings.map(lambda found: [reason for _, reason in found])
            for name, count in per_rule.items():
                reason_counts[name] = reason_counts.get(name, 0) + count
            bad = reasons.map(bool)
            rows += len(chunk)
            failing += int(bad.sum())
            new = ~chunk["id"].isin(accepted)
            new_rows += int(new.sum())
            new_failing += int((bad & new).sum())
            held = {str(checks.at[i, "source_id"]): reasons[i] for i in checks.index[bad]}
            ledger.quarantine_records(ctx.run_id, cfg.name, flow.name, object_name, held)
            quarantine.add(object_name, {str(checks.at[i, "source_id"]): findings[i] for i in checks.index[bad]},
                           new=set(held) - held_before)
            ledger.add_outcomes(ctx.run_id, cfg.name, flow.name, object_name,
                                [{"source_id": s, "outcome": "quarantined", "message": "; ".join(r)}
                                 for s, r in held.items()])
            good.write(chunk[~bad].assign(**{v.matched_column: checks.loc[~bad, v.matched_column]}))
            # A GX validation leaves reference cycles that Python's collector reaches late;
            # collected per chunk, the step's peak at 1,000,000 rows fell from 822 to 658 MiB.
            gc.collect()
    good_file = good.close()
    quarantined = quarantine.close()
    gone = sorted(seen.missing(held_before)) if v.feature(cfg) else []
    if gone:  # read again by id and not found: deleted in the source, nothing left to send
        ledger.resolve_quarantine(cfg.name, flow.name, object_name, gone)
        ledger.add_outcomes(ctx.run_id, cfg.name, flow.name, object_name,
                            [{"source_id": s, "outcome": "source_deleted",
                              "message": "quarantined record no longer exists in the source vault"} for s in gone])
        log.info("%d quarantined %s records no longer exist in the source: quarantine closed", len(gone), object_name)
    report = validator.build_docs() if suites else None
    passed = not new_failing or new_failing / new_rows <= cfg.quality.max_failing_share
    summary = {"connection": cfg.name, "direction": flow.name, "dag_run_id": ctx.dag_run_id,
               "window_start": ctx.window_start, "window_end": ctx.window_end, "object": object_name,
               "rows": rows, "failing_rows": failing, "new_rows": new_rows, "new_failing_rows": new_failing,
               "reasons": reason_counts, "suites": suites, "new_quarantined": quarantined["new"],
               "quarantine_csv": quarantined["csv"], "quarantine_json": quarantined["json"],
               "max_failing_share": cfg.quality.max_failing_share, "passed": passed, "data_docs": report}
    summary_path = quality.write_summary(cfg.name, flow.name, ctx.dag_run_id, summary)
    ledger.add_dq_summary(ctx.run_id, cfg.name, flow.name, object_name, rows, failing, reason_counts, passed, report)
    add_counts(ledger, ctx, {object_name: {"quarantined": failing, "valid": rows - failing}}, dq_report=report)
    log.info("data quality of %s: %d rows, %d quarantined %s; Data Docs: %s; summary: %s",
             object_name, rows, failing, reason_counts, report, summary_path)
    quarantine.log_first()
    quality.check_threshold(new_rows, new_failing, cfg.quality.max_failing_share)
    return Staged({VALID: good_file})


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive when the block starts (Airflow, pandas, GX once imported: most of the
    process) are left out of garbage collections until it ends (gc.freeze), so a collection in
    the block walks what the block made, not the whole process (validate's per-chunk collection
    took 0.35 s a chunk before)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------- transform


@_active(Staged)
def transform(flow: Flow, cfg, ctx: RunContext, staged: Staged, validated: Staged) -> Staged:
    """Apply the field rules: one staged records file per enabled target."""
    import pandas as pd

    out = {}
    for target in flow.targets:
        if not target.enabled(cfg):
            continue
        source = validated.path(VALID) if target.source == VALID else staged.path(target.source)
        out[target.records] = staging.write_frames(
            f"{ctx.run_dir}/{target.records}.records.parquet",
            (pd.DataFrame(target.build(chunk, cfg)) for chunk in staging.read_chunks(source)))
    return Staged(out)


# ---------------------------------------------------------------- load


@_active(dict)
def load(flow: Flow, cfg, ctx: RunContext, client, staged: Staged, records: Staged,
         ledger: Ledger | None = None, final_attempt: bool = True) -> dict:
    """Upsert every target in order, then apply the deletion marks (this run's and those left
    pending by earlier runs); per-object counts into the run's ledger row.

    A retried load starts over (its outcomes replace the failed attempt's), but a record an
    earlier attempt of the run wrote keeps that outcome (the retry finds it unchanged). Loads of
    the same connection and target object never overlap (a ledger lock): a slow backfill and a
    scheduled run write one after the other, each batch checked against the newest version.
    `final_attempt`: no task retry is left, so what is still refused or uncertain is quarantined
    and re-read by the next run instead of waiting for a retry."""
    from clinical_crm.engine.load import lock_name as load_lock_name

    ledger = ledger or Ledger()
    objects = {t.source_object(cfg) for t in flow.targets} | {d.source_object(cfg) for d in flow.deletions}
    earlier = ledger.written_outcomes(ctx.run_id, objects)
    for obj in sorted(objects):
        ledger.clear_outcomes(ctx.run_id, obj, only=CLEARED_ON_RETRY)  # a retried task starts over
    counts: dict[str, dict] = {}
    for target in flow.targets:
        if target.enabled(cfg):
            with ledger.exclusive(load_lock_name(ctx.connection, target.target_object(cfg))):
                counts[target.source_object(cfg)] = _load_target(
                    ledger, ctx, client, cfg, target, records.path(target.records), earlier, final_attempt)
    for mark in flow.deletions:
        if mark.enabled(cfg):
            totals = counts.setdefault(mark.source_object(cfg), {})
            for key, value in _apply_deletions(ledger, ctx, client, cfg, mark, staged, earlier).items():
                totals[key] = totals.get(key, 0) + value
    add_counts(ledger, ctx, counts)
    _raise_for_refusals(counts, final_attempt)
    return counts


def _as_counted(outcomes: list[dict], earlier: dict[str, str]) -> list[dict]:
    """A retried attempt finds unchanged what an earlier attempt of the same run wrote: such a
    record keeps the outcome of the attempt that wrote it (`earlier`: source id -> outcome). When
    that attempt got no answer (`unknown`), nobody can say whether it created or updated the
    record: it stays `unchanged`, and the message says why."""
    counted = []
    for o in outcomes:
        before = earlier.get(o["source_id"]) if o["outcome"] == "unchanged" else None
        if before == "unknown":
            o = o | {"message": "an earlier attempt of this run sent it and got no answer; the vault holds these values"}
        elif before is not None:
            o = o | {"outcome": before, "message": "written by an earlier attempt of this run"}
        counted.append(o)
    return counted


def _load_target(ledger: Ledger, ctx: RunContext, client, cfg, target, path: str | None,
                 earlier: dict[str, dict[str, str]] | None = None, final_attempt: bool = True) -> dict:
    """Upsert one staged records file chunk by chunk (memory follows the chunk, not the file);
    record outcomes, the id map and (for the validated object) the quarantine they leave.
    Records older than a version another run already wrote are not sent (outcome superseded,
    see load.upsert).

    `load.concurrency` write calls are in flight at once (each its own batch: a record is in one
    call only, and the staged records are unique by source id), so the vault's latency is paid
    once per round of calls, not per call. This thread reads and prepares the batches, the writer
    threads send them, and one ledger thread records their outcomes in the order they were sent;
    at most 2 x concurrency batches wait, so memory follows the concurrency, not the file. When a
    write fails, the calls still in flight are answered and recorded before the error goes up:
    the ledger then holds what reached the vault, one outcome per record."""
    from clinical_crm.engine import load
    from clinical_crm.vault.fields import MAX_BATCH

    source_object, target_object = target.source_object(cfg), target.target_object(cfg)
    written_before = (earlier or {}).get(source_object, {})
    batch_size = min(cfg.load.batch_size, MAX_BATCH)
    concurrency = cfg.load.concurrency
    # every count always present: a retried load's counts then replace the failed attempt's in
    # the run's ledger row (add_counts merges key by key), never mix with them
    totals: dict[str, int] = dict.fromkeys(("created", "updated", "unchanged", "failed", "superseded", "unknown",
                                            "loaded", "transient_failed", "permission_denied"), 0)

    def record(outcomes: list[dict] | None) -> None:
        if outcomes is None:  # a batch not sent (a write before it failed)
            return
        outcomes = _as_counted(outcomes, written_before)
        ledger.add_outcomes(ctx.run_id, ctx.connection, ctx.direction, source_object, outcomes)
        loaded = [o for o in outcomes if o["outcome"] in load.LOADED]
        ledger.map_ids(ctx.connection, target_object,
                       [{"source_id": o["source_id"], "target_id": o["target_id"], "external_id": o["external_id"]}
                        for o in loaded])
        failed = [o for o in outcomes if o["outcome"] == "failed"]
        transient = [o for o in failed if o.get("error_type") in TRANSIENT_RECORD_ERRORS]
        if target.holds_quarantine:
            ledger.resolve_quarantine(ctx.connection, ctx.direction, source_object, [o["source_id"] for o in loaded])
            # a record the target vault refuses stays visible and is tried again by every run; a
            # transient refusal or an unanswered write too, once no task retry is left
            held = [o for o in failed if o not in transient]
            if final_attempt:
                held += transient + [o for o in outcomes if o["outcome"] == "unknown"]
            ledger.quarantine_records(ctx.run_id, ctx.connection, ctx.direction, source_object, {
                o["source_id"]: [f"{target_object} refused the record: {o.get('error_type')}: {o.get('message') or ''}".rstrip(": ")
                                 if o["outcome"] == "failed" else f"{target_object}: {o.get('message')}"]
                for o in held})
        _tally_failures(totals, failed, source_object)
        for key, value in load.tally(outcomes).items():
            totals[key] = totals.get(key, 0) + value

    # the version check runs in the writer threads, per batch right before each send of its call
    # (the smallest window between the check and the write)
    guard = load.VersionGuard(ledger, ctx.connection, ctx.direction, source_object, ctx.run_id)
    sent: deque = deque()  # write calls in flight, oldest first
    recorded: deque = deque()  # ledger writes not yet checked (the ledger thread ends them in order)
    failed = threading.Event()  # once a write fails, the batches not sent yet stay unsent

    def write(batch: list[dict]) -> list[dict] | None:
        if failed.is_set():
            return None
        try:
            return load.upsert(client, target_object, batch, target.id_param(cfg), batch_size, guard=guard)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(concurrency, thread_name_prefix="load-write") as writers, \
            ThreadPoolExecutor(1, thread_name_prefix="load-ledger") as recorder:
        try:
            for chunk in staging.read_chunks(path, chunk_rows=batch_size * 20):
                batch = staging.records(chunk)
                if target.prepare is not None:
                    batch = [target.prepare(r, cfg) for r in batch]
                for start in range(0, len(batch), batch_size):
                    # the answer first, then out of `sent`: a call is never outside it unrecorded
                    while len(sent) >= 2 * concurrency:
                        recorded.append(recorder.submit(record, sent[0].result()))
                        sent.popleft()
                    while recorded and recorded[0].done():
                        recorded.popleft().result()  # a ledger failure stops the load here, as in line
                    sent.append(writers.submit(write, batch[start:start + batch_size]))
            while sent:
                recorded.append(recorder.submit(record, sent[0].result()))
                sent.popleft()
            for f in recorded:
                f.result()
        except BaseException as error:
            failed.set()
            _record_the_rest(error, sent, recorded, record)
            raise
    return totals


def _record_the_rest(error: BaseException, sent, recorded, record) -> None:
    """A write (or a ledger write) failed, or the task was stopped: batches not sent yet are not
    sent (cancelled, or skipped by their writer); wait for the ledger thread, then record, in this
    thread, what the failed write knows (load.WriteUncertain) and the answers of every write that
    was in flight, so that the ledger holds all that reached the vault before the error goes up."""
    from clinical_crm.engine import load

    sent = [f for f in sent if not f.cancel()]  # those already running cannot be cancelled
    for f in recorded:
        if not f.cancelled():
            with contextlib.suppress(Exception):
                f.result()
    answers = [error] + [f.exception() or f.result() for f in sent if f.exception() is not error]  # None: not sent
    for answer in answers:
        outcomes = answer.outcomes if isinstance(answer, load.WriteUncertain) else answer
        try:
            if isinstance(outcomes, list):
                record(outcomes)
            elif answer is not error:
                log.error("a write in flight failed too: %s: %s", type(answer).__name__, answer)
        except Exception as failure:  # the ledger itself fails: the first error is the one to raise
            log.error("could not record the outcomes of a write: %s: %s", type(failure).__name__, failure)


def _tally_failures(totals: dict[str, int], failed: list[dict], object_name: str) -> None:
    """Log the first failures; count the transient ones and the permission refusals apart."""
    for o in failed[:20]:
        log.warning("%s %s failed: %s %s", object_name, o["source_id"], o.get("error_type"), o.get("message"))
    totals["transient_failed"] = totals.get("transient_failed", 0) + sum(
        o.get("error_type") in TRANSIENT_RECORD_ERRORS for o in failed)
    totals["permission_denied"] = totals.get("permission_denied", 0) + sum(
        o.get("error_type") == "INSUFFICIENT_ACCESS" for o in failed)


def _apply_deletions(ledger: Ledger, ctx: RunContext, client, cfg, mark, staged: Staged,
                     earlier: dict[str, dict[str, str]] | None = None) -> dict:
    """Queue this run's deleted records, then mark every pending one (this run's and those
    earlier runs left behind); what did not go through stays pending for the next run."""
    from clinical_crm.engine import load
    from clinical_crm.vault.fields import GLOBAL_ID, ID

    source_object = mark.source_object(cfg)
    deleted = [(i, g) for chunk in staging.read_chunks(staged.path(mark.staged)) for i, g in zip(chunk[ID], chunk[GLOBAL_ID])]
    ledger.queue_deletions(ctx.connection, ctx.direction, source_object, deleted, ctx.run_id)
    pending = ledger.pending_deletions(ctx.connection, ctx.direction, source_object)
    outcomes, no_target = [], set()
    if pending:
        outcomes, no_target = load.mark_deleted(
            client, mark, cfg, pending, cfg.load.batch_size,
            expect=lambda changes: ledger.expect_deletions(ctx.connection, ctx.direction, source_object, changes),
            concurrency=cfg.load.concurrency)
    outcomes = _as_counted(outcomes, (earlier or {}).get(source_object, {}))
    ledger.add_outcomes(ctx.run_id, ctx.connection, ctx.direction, source_object, outcomes)
    ledger.settle_deletions(ctx.connection, ctx.direction, source_object, outcomes, no_target, ctx.run_id)
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    # applied: by any attempt of this run (an earlier attempt's marks are not redone, see
    # CLEARED_ON_RETRY); every key always present, so a retry's counts replace the attempt's
    totals = {"deletions_applied": ledger.outcome_count(ctx.run_id, source_object, "marked_deleted"),
              "deletions_already_applied": sum(o["outcome"] == "unchanged" for o in outcomes),
              "deletions_failed": len(failed)}
    _tally_failures(totals, failed, source_object)
    return totals


def _raise_for_refusals(counts: dict[str, dict], final_attempt: bool = True) -> None:
    """After every outcome is in the ledger: records refused for lack of permission fail the task
    at once (VaultPermissionError: no retries); transient refusals fail it to be retried (on the
    final attempt they are quarantined, so the next run reads them again)."""
    from clinical_crm.vault.errors import VaultPermissionError, VaultTransientError

    denied = {obj: c["permission_denied"] for obj, c in counts.items() if c.get("permission_denied")}
    if denied:
        raise VaultPermissionError("INSUFFICIENT_ACCESS", f"the vault refused records of {denied} for lack of "
                                   f"permission; each record's outcome and the vault's message are in the ledger. "
                                   f"Give the integration user the missing permission, then re-run")
    left = {obj: c["transient_failed"] for obj, c in counts.items() if c.get("transient_failed")}
    if left:
        then = ("no task retry is left: they are quarantined (deletion marks stay queued) and the next run "
                "sends them again" if final_attempt else "the load task is retried (upserts are idempotent)")
        raise VaultTransientError("RACE_CONDITION", f"records refused with a transient error after the client's "
                                  f"re-sends ({left}); {then}")
