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
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from clinical_crm.engine import staging, windows
from clinical_crm.engine.context import RunContext, Staged
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.run_counts import PRE_STEP_COUNTS  # the pre-step's writes (to the source vault), apart
from clinical_crm.outcomes import CLEARED_ON_RETRY, LOAD_OUTCOMES, VALIDATION_OUTCOMES, Outcome, RecordResult  # noqa: F401 (LOAD_OUTCOMES: the runner's vocabulary)
from clinical_crm.flows.base import SOURCE_ID, SOURCE_OBJECT, VALID, Flow, Target, Upsert, Writes

log = logging.getLogger(__name__)

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
    """Merge per-object counts into the run's ledger row (a section such as PRE_STEP_COUNTS
    merges object by object too)."""
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
            if isinstance(c, dict) and obj != PRE_STEP_COUNTS and c.get("deletions_failed")}
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


@_active(Staged)
def pre_step(flow: Flow, cfg, ctx: RunContext, clients: dict, ledger: Ledger | None = None) -> Staged:
    """The flow's pre-step (e.g. automated activities): what it plans is written through the load
    path (version guard, load lock, one outcome per record), then its follow-up updates (e.g.
    flags cleared); stages the ids written, which the extraction reads whatever their time."""
    import pandas as pd

    ledger = ledger or Ledger()
    ids: list[str] = []
    obj = ""
    if flow.pre_step is not None:
        client = clients[flow.source_side]
        writes = flow.pre_step.plan(client)
        ids, counts = _write_pre_step(ledger, ctx, client, cfg, writes)
        obj = writes.object
        add_counts(ledger, ctx, {PRE_STEP_COUNTS: counts})  # apart: these went to the source vault
    return Staged({PRE_STEP_IDS: staging.write_frames(f"{ctx.run_dir}/{PRE_STEP_IDS}.parquet",
                                                      [pd.DataFrame({"id": ids, "object": [obj] * len(ids)})],
                                                      ["id", "object"])})


def _write_pre_step(ledger: Ledger, ctx: RunContext, client, cfg, writes: Writes) -> tuple[list[str], dict]:
    """Upsert the pre-step's records (one write for all its source objects), then make the
    updates `writes.then` asks for; outcomes and counts by source object."""
    from clinical_crm.engine import load

    object_of = {str(r[SOURCE_ID]): r[SOURCE_OBJECT] for r in writes.records}
    records = [{k: v for k, v in r.items() if k != SOURCE_OBJECT} for r in writes.records]
    outcomes: list[dict] = []
    with ledger.exclusive(load.lock_name(ctx.connection, writes.object)):
        _write(ledger, ctx, client, cfg, writes.upsert, [records] if records else [], object_of=object_of, collect=outcomes,
               total=len(records), step=f"pre-step {writes.object}")
    written: dict[str, list[str]] = {}
    for o in outcomes:
        if o["outcome"] in load.LOADED:
            written.setdefault(object_of[o["source_id"]], []).append(o["source_id"])
    counts: dict[str, dict] = {}
    for obj, flagged in writes.counted.items():
        mine = [o for o in outcomes if object_of[o["source_id"]] == obj]
        notes = [n for n in writes.notes if n.source_object == obj]
        report = [{"source_id": n.source_id, "outcome": n.outcome, "message": n.message} for n in notes]
        updates = writes.then({obj: written.get(obj, [])}).get(obj, [])
        report += [o | {"message": f"flag not cleared: {o.get('message')}"}
                   for o in load.update(client, obj, updates, cfg.load.batch_size) if o["outcome"] == "failed"]
        ledger.scope(ctx.connection, ctx.direction, obj).add_outcomes(ctx.run_id, report)
        counts[obj] = load.tally(mine) | {"flagged": flagged, "needs_person": len(notes)}
        log.info("pre-step writes from %s: %s", obj, counts[obj])
    ids = [o["target_id"] for o in outcomes if o["outcome"] in load.LOADED and o["target_id"]]
    return ids, counts


@_active(Staged)
def extract(flow: Flow, cfg, ctx: RunContext, clients: dict, pre: Staged | None = None,
            ledger: Ledger | None = None) -> Staged:
    """Stage what the flow reads (engine.plan); records quarantined before and those the
    pre-step wrote are read again by id whatever their modification time."""
    from clinical_crm.engine.plan import Reading, counts
    from clinical_crm.engine.progress import for_run

    ledger = ledger or Ledger()
    reread: dict[str, list[str]] = {}
    if flow.validation is not None:
        reread[flow.validation.object] = ledger.scope(cfg.name, flow.name, flow.validation.object).quarantined_ids()
    if pre is not None and PRE_STEP_IDS in pre:
        for chunk in staging.read_chunks(pre.path(PRE_STEP_IDS)):
            for record_id, obj in zip(chunk["id"], chunk["object"]):
                reread.setdefault(str(obj), []).append(str(record_id))
    files = Reading(flow.reads, clients, ctx.window, ctx.run_dir, cfg.load.concurrency, reread,
                    known=lambda obj, ids: ledger.known_external_ids(cfg.name, obj, ids),
                    page_size=cfg.load.query_page_size, progress=for_run(ledger, ctx.run_id)).run()
    staged = Staged(files)
    add_counts(ledger, ctx, counts(flow.reads, files))
    log.info("extracted %s", {name: f.rows for name, f in staged.files.items()})
    return staged


# ---------------------------------------------------------------- validate


@_active(Staged)
def validate(flow: Flow, cfg, ctx: RunContext, staged: Staged, ledger: Ledger | None = None) -> Staged:
    """Run the GX suites once over every row, quarantine the rows GX finds failing with their
    reasons, stage the good rows (VALID).

    Raises QualityThresholdExceeded (after recording everything) when too many rows fail.
    """
    from clinical_crm.engine import quality
    from clinical_crm.engine.quarantine_report import QuarantineReport

    ledger = ledger or Ledger()
    v = flow.validation
    if v is None:  # the connection file sends nothing this flow would check
        return Staged()
    object_name = v.object
    mine = ledger.scope(cfg.name, flow.name, object_name)  # this flow's records of the validated object
    reference = references(v, staged)
    # Records quarantined by earlier runs are re-checked every run (held_before). While they still
    # fail, those a successful run already accepted are known open items, not new defects of this
    # window: the failing share that can fail the run counts the other rows only.
    held_before = set(mine.quarantined_ids())
    accepted = mine.accepted_quarantine_ids()
    ledger.clear_outcomes(ctx.run_id, object_name, only=list(VALIDATION_OUTCOMES))  # a retry starts over
    checked = quality.CheckedRows(staged.path(v.read), v.matched_column)
    validator = quality.Validator(cfg.name, ctx.dag_run_id, keep_runs=cfg.retention.data_docs_runs, ledger=ledger)
    verdict = checked.judge(validator, object_name, v.rules, lambda chunk: v.checks(chunk, reference))
    good = staging.FrameWriter(f"{ctx.run_dir}/{v.read}.valid.parquet")
    quarantine = QuarantineReport(cfg.name, flow.name, ctx.dag_run_id)
    rows = failing = new_rows = new_failing = 0
    for chunk, bad in checked.chunks(verdict):
        new = ~chunk["id"].isin(accepted)
        rows += len(chunk)
        failing += int(bad.sum())
        new_rows += int(new.sum())
        new_failing += int((bad & new).sum())
        findings = {str(i): verdict.findings[i] for i in chunk["id"][bad]}
        held = {s: [reason for _, reason in found] for s, found in findings.items()}
        mine.quarantine_records(ctx.run_id, held)
        quarantine.add(object_name, findings, new=set(held) - held_before)
        mine.add_outcomes(ctx.run_id, [RecordResult(s, Outcome.QUARANTINED, message="; ".join(r))
                                       for s, r in held.items()])
        good.write(chunk[~bad])
    good_file = good.close()
    quarantined = quarantine.close()
    gone = sorted(checked.seen.missing(held_before))
    if gone:  # read again by id and not found: deleted in the source, nothing left to send
        mine.resolve_quarantine(gone)
        mine.add_outcomes(ctx.run_id, [RecordResult(s, Outcome.SOURCE_DELETED,
                                                    message="quarantined record no longer exists in the source vault")
                                       for s in gone])
        log.info("%d quarantined %s records no longer exist in the source: quarantine closed", len(gone), object_name)
    report, reason_counts = verdict.data_docs, verdict.per_rule
    passed = not new_failing or new_failing / new_rows <= cfg.quality.max_failing_share
    summary = {"connection": cfg.name, "direction": flow.name, "dag_run_id": ctx.dag_run_id,
               "window_start": ctx.window_start, "window_end": ctx.window_end, "object": object_name,
               "rows": rows, "failing_rows": failing, "new_rows": new_rows, "new_failing_rows": new_failing,
               "reasons": reason_counts, "suites": verdict.suites, "new_quarantined": quarantined["new"],
               "quarantine_csv": quarantined["csv"], "quarantine_json": quarantined["json"],
               "max_failing_share": cfg.quality.max_failing_share, "passed": passed, "data_docs": report}
    summary_path = quality.write_summary(cfg.name, flow.name, ctx.dag_run_id, summary)
    mine.add_dq_summary(ctx.run_id, rows, failing, reason_counts, passed, report)
    add_counts(ledger, ctx, {object_name: {"quarantined": failing, "valid": rows - failing}}, dq_report=report)
    log.info("data quality of %s: %d rows, %d quarantined %s; Data Docs: %s; summary: %s",
             object_name, rows, failing, reason_counts, report, summary_path)
    quarantine.log_first()
    quality.check_threshold(new_rows, new_failing, cfg.quality.max_failing_share)
    return Staged({VALID: good_file})


def references(validation, staged: Staged) -> dict:
    """What the checks compare against: the staged reads the validation names, as frames."""
    return {name: staging.read_frame(staged.path(name)) for name in validation.reference}


# ---------------------------------------------------------------- transform


@_active(Staged)
def transform(flow: Flow, cfg, ctx: RunContext, staged: Staged, validated: Staged) -> Staged:
    """Apply the field rules: one staged records file per enabled target."""
    import pandas as pd

    out = {}
    for target in flow.targets:
        source = validated.path(VALID) if target.source == VALID else staged.path(target.source)
        out[target.records] = staging.write_frames(
            f"{ctx.run_dir}/{target.records}.records.parquet",
            (pd.DataFrame(target.build(chunk)) for chunk in staging.read_chunks(source)))
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
    objects = {t.source_object for t in flow.targets} | {d.source_object for d in flow.deletions}
    earlier = ledger.written_outcomes(ctx.run_id, objects)
    for obj in sorted(objects):
        ledger.clear_outcomes(ctx.run_id, obj, only=list(CLEARED_ON_RETRY))  # a retried task starts over
    counts: dict[str, dict] = {}
    for target in flow.targets:
        with ledger.exclusive(load_lock_name(ctx.connection, target.target_object)):
            counts[target.source_object] = _load_target(
                ledger, ctx, client, cfg, target, records.path(target.records), earlier, final_attempt,
                total=records.rows(target.records))
    for mark in flow.deletions:
        totals = counts.setdefault(mark.source_object, {})
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


def _load_target(ledger: Ledger, ctx: RunContext, client, cfg, target: Target, path: str | None,
                 earlier: dict[str, dict[str, str]] | None = None, final_attempt: bool = True,
                 total: int | None = None) -> dict:
    """Upsert one staged records file chunk by chunk (memory follows the chunk, not the file);
    `total`: its rows (the progress lines' total)."""
    from clinical_crm.vault.fields import MAX_BATCH

    batch_size = min(cfg.load.batch_size, MAX_BATCH)

    def batches():
        for chunk in staging.read_chunks(path, chunk_rows=batch_size * 20):
            batch = staging.records(chunk)
            yield [target.prepare(r) for r in batch] if target.prepare is not None else batch

    return _write(ledger, ctx, client, cfg, target.upsert, batches(), earlier, final_attempt, total=total)


def _write(ledger: Ledger, ctx: RunContext, client, cfg, target: Upsert, chunks,
           earlier: dict[str, dict[str, str]] | None = None, final_attempt: bool = True,
           object_of: dict[str, str] | None = None, collect: list | None = None,
           total: int | None = None, step: str | None = None) -> dict:
    """The load path of every write: upsert the records of `chunks` (lists of records) by the
    target's id_param; record outcomes, the id map and (for the validated object) the quarantine
    they leave. `object_of`: {source id: source object} when the records come from several
    source objects (a pre-step's), else all are the target's source object; `collect` receives
    every outcome.
    Records older than a version another run already wrote are not sent (outcome superseded,
    see load.upsert).

    `load.concurrency` write calls are in flight at once (each its own batch: a record is in one
    call only, and the staged records are unique by source id), so the vault's latency is paid
    once per round of calls, not per call. This thread reads and prepares the batches, the writer
    threads send them, and one ledger thread records their outcomes in the order they were sent;
    at most 2 x concurrency batches wait, so memory follows the concurrency, not the file. When a
    write fails, the calls still in flight are answered and recorded before the error goes up:
    the ledger then holds what reached the vault, one outcome per record.

    Progress (engine.progress): records answered of `total`, logged about every 30 s or 5 % and
    kept in the run's ledger row under `step` (default `load <target object>`)."""
    from clinical_crm.engine import load
    from clinical_crm.engine.progress import Progress, for_run
    from clinical_crm.vault.fields import MAX_BATCH

    source_object, target_object = target.source_object, target.target_object
    written_before = (earlier or {}).get(source_object, {})
    batch_size = min(cfg.load.batch_size, MAX_BATCH)
    concurrency = cfg.load.concurrency
    # every count always present: a retried load's counts then replace the failed attempt's in
    # the run's ledger row (add_counts merges key by key), never mix with them
    totals: dict[str, int] = dict.fromkeys(("created", "updated", "unchanged", "failed", "superseded", "unknown",
                                            "loaded", "transient_failed", "permission_denied"), 0)
    records = ledger.scope(ctx.connection, ctx.direction, source_object)  # the target's source records
    what = step or f"load {target_object}"
    progress = Progress(what, total, writer=for_run(ledger, ctx.run_id), burst=_burst_of(client), logger=log)

    def record(outcomes: list[dict] | None) -> None:
        if outcomes is None:  # a batch not sent (a write before it failed)
            return
        outcomes = _as_counted(outcomes, written_before)
        if collect is not None:
            collect.extend(outcomes)
        if object_of is None:
            records.add_outcomes(ctx.run_id, outcomes)
        else:
            for obj in sorted({object_of[o["source_id"]] for o in outcomes}):
                ledger.scope(ctx.connection, ctx.direction, obj).add_outcomes(
                    ctx.run_id, [o for o in outcomes if object_of[o["source_id"]] == obj])
        loaded = load.record_written(ledger.id_map(ctx.connection, target_object), outcomes)
        failed = [o for o in outcomes if o["outcome"] == "failed"]
        transient = [o for o in failed if o.get("error_type") in TRANSIENT_RECORD_ERRORS]
        if target.holds_quarantine:
            records.resolve_quarantine([o["source_id"] for o in loaded])
            # a record the target vault refuses stays visible and is tried again by every run; a
            # transient refusal or an unanswered write too, once no task retry is left
            held = [o for o in failed if o not in transient]
            if final_attempt:
                held += transient + [o for o in outcomes if o["outcome"] == "unknown"]
            records.quarantine_records(ctx.run_id, {
                o["source_id"]: [f"{target_object} refused the record: {o.get('error_type')}: "
                                 f"{o.get('message') or ''}".rstrip(": ")
                                 if o["outcome"] == "failed" else f"{target_object}: {o.get('message')}"]
                for o in held})
        _tally_failures(totals, failed, source_object)
        for key, value in load.tally(outcomes).items():
            totals[key] = totals.get(key, 0) + value
        progress.advance(len(outcomes))

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
            return load.upsert(client, target_object, batch, target.id_param, batch_size, guard=guard)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(concurrency, thread_name_prefix="load-write") as writers, \
            ThreadPoolExecutor(1, thread_name_prefix="load-ledger") as recorder:
        try:
            for batch in chunks:
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
            progress.finish("failed")
            raise
    progress.finish()
    return totals


def _burst_of(client):
    """The calls left in the client's burst window, as last seen (None when it does not say)."""
    return lambda: getattr(client, "burst_remaining", None)


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
            elif answer is not None and answer is not error:  # None: a batch never sent
                log.error("a write in flight failed too: %s: %s", type(answer).__name__, answer)
        except Exception as failure:  # the ledger itself fails: the first error is the one to raise
            log.error("could not record the outcomes of a write: %s: %s", type(failure).__name__, failure)


def _tally_failures(totals: dict[str, int], failed: list[dict], object_name: str) -> None:
    """Log the first failures; count the transient ones and the permission refusals apart."""
    from clinical_crm.engine.load import log_failures  # (this module's `load` is the load step)

    log_failures(object_name, failed)
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

    source_object = mark.source_object
    deleted = [(i, g) for chunk in staging.read_chunks(staged.path(mark.staged)) for i, g in zip(chunk[ID], chunk[GLOBAL_ID])]
    queue = ledger.scope(ctx.connection, ctx.direction, source_object)
    queue.queue_deletions(deleted, ctx.run_id)
    pending = queue.pending_deletions()
    outcomes: list[dict] = []
    no_target: set[str] = set()
    if pending:
        outcomes, no_target = load.mark_deleted(client, mark, pending, cfg.load.batch_size,
                                                expect=queue.expect_deletions, concurrency=cfg.load.concurrency)
    outcomes = _as_counted(outcomes, (earlier or {}).get(source_object, {}))
    queue.add_outcomes(ctx.run_id, outcomes)
    queue.settle_deletions(outcomes, no_target, ctx.run_id)
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
