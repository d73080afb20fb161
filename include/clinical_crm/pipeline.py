"""The steps of one run, as plain functions the DAG tasks call (no Airflow here).

    begin -> [automate] -> extract -> validate -> transform -> load -> finish

Each step takes the small `run` dict made by `begin` (ledger run id, window, staging folder) and
the {name: {path, rows}} dicts of earlier steps, and returns the same kind of small dict, so
XCom carries paths and counts only. Every step records what it did in the ledger.
"""
from __future__ import annotations

import gc
import logging
from datetime import datetime
from typing import Any

from clinical_crm import extract, staging, windows
from clinical_crm.ledger import Ledger

log = logging.getLogger(__name__)

CTMS_TO_CRM = "ctms_to_crm"
CRM_TO_CTMS = "crm_to_ctms"
DIRECTIONS = (CTMS_TO_CRM, CRM_TO_CTMS)
LOAD_OUTCOMES = ["created", "updated", "unchanged", "failed", "marked_deleted", "superseded"]  # what load writes


def _quality():  # GX and its imports only when a run validates
    from clinical_crm import quality

    return quality


# ---------------------------------------------------------------- begin / finish


def begin(cfg, direction: str, dag_run_id: str, data_interval_start: datetime | None,
          data_interval_end: datetime | None, params: dict | None = None, ledger: Ledger | None = None) -> dict:
    """Decide the run's window and open its ledger row. An inactive configuration moves nothing."""
    ledger = ledger or Ledger()
    params = params or {}
    # Before the first success the schedule's start date stands for "the end of the last
    # successful window": the first run (catchup is off) then sends everything since the start
    # date instead of skipping it.
    last_success = ledger.last_success_end(cfg.name, direction) or cfg.schedule.start_date
    window = windows.run_window(
        data_interval_start, data_interval_end, last_success,
        cfg.lookback_minutes, window_start=params.get("window_start"), window_end=params.get("window_end"),
        first_start=cfg.schedule.start_date)
    run = {"connection": cfg.name, "direction": direction, "dag_run_id": dag_run_id, "active": cfg.active,
           **window.as_dict(), "run_dir": staging.run_dir(cfg.name, direction, dag_run_id)}
    if not cfg.active:
        run["run_id"] = ledger.start_run(cfg.name, direction, dag_run_id, window.start, window.end, state="inactive")
        ledger.finish_run(run["run_id"], "inactive", counts={},
                          message="configuration is inactive: nothing was moved")
        log.warning("connection %s is inactive (active: false in %s): this run moves nothing",
                    cfg.name, cfg.source_file)
        return run
    run["run_id"] = ledger.start_run(cfg.name, direction, dag_run_id, window.start, window.end)
    log.info("%s %s covers %s .. %s (ledger run %s)", cfg.name, direction, window.start.isoformat(),
             window.end.isoformat(), run["run_id"])
    return run


def window_of(run: dict) -> windows.Window:
    return windows.Window(windows.parse_time(run["window_start"]), windows.parse_time(run["window_end"]))


def add_counts(ledger: Ledger, run: dict, counts: dict[str, dict], dq_report: str | None = None) -> dict:
    """Merge per-object counts into the run's ledger row."""
    current = ledger.run(run["run_id"])["counts"] or {}
    for obj, values in counts.items():
        current[obj] = {**current.get(obj, {}), **values}
    ledger.set_counts(run["run_id"], current, dq_report)
    return current


def fail(run: dict | None, error: BaseException, ledger: Ledger | None = None) -> None:
    """Mark the run failed in the ledger (a later success of a retry overrides it)."""
    if run and run.get("run_id"):
        (ledger or Ledger()).finish_run(run["run_id"], "failed", message=f"{type(error).__name__}: {error}")


def finish(run: dict, ledger: Ledger | None = None) -> dict:
    ledger = ledger or Ledger()
    if not run["active"]:
        return ledger.run(run["run_id"])
    ledger.finish_run(run["run_id"], "success", message="")
    staging.remove_run(run["run_dir"])
    result = ledger.run(run["run_id"])
    log.info("run %s finished: %s", run["run_id"], result["counts"])
    return result


# ---------------------------------------------------------------- CTMS -> CRM


def automate(cfg, run: dict, ctms, ledger: Ledger | None = None) -> dict:
    """Automated Clinical Activities (feature automated_activities); returns {path, rows} of the
    activity ids written, which extraction then reads whatever their modification time."""
    from clinical_crm import automation
    import pandas as pd

    ledger = ledger or Ledger()
    ids: list[str] = []
    if run["active"] and cfg.features.automated_activities and cfg.features.clinical_activities:
        result = automation.automate_activities(cfg, ctms, ledger, run)
        ids = result["activity_ids"]
        add_counts(ledger, run, result["counts"])
    return staging.write_frames(f"{run['run_dir']}/automated_activity_ids.parquet",
                                [pd.DataFrame({"id": ids})], ["id"])


def extract_ctms_to_crm(cfg, run: dict, ctms, crm, automated: dict | None = None,
                        ledger: Ledger | None = None) -> dict:
    ledger = ledger or Ledger()
    if not run["active"]:
        return {}
    from clinical_crm.load import staged_ids

    ids = ledger.quarantined_ids(cfg.name, run["direction"], cfg.ctms.activity.object)
    ids += staged_ids(automated, "id")
    staged = extract.extract_ctms_to_crm(cfg, ctms, crm, window_of(run), run["run_dir"], ids, ledger)
    counts = {cfg.ctms.activity.object: {"extracted": staged[extract.CLINICAL_ACTIVITIES]["rows"]}}
    if extract.STUDIES in staged:
        counts[cfg.ctms.study.object] = {"extracted": staged[extract.STUDIES]["rows"],
                                        "deleted": staged[extract.DELETED_STUDIES]["rows"]}
        counts[cfg.ctms.site.object] = {"extracted": staged[extract.STUDY_SITES]["rows"],
                                       "deleted": staged[extract.DELETED_SITES]["rows"]}
    if extract.DELETED_ACTIVITIES in staged:
        counts[cfg.ctms.activity.object]["deleted"] = staged[extract.DELETED_ACTIVITIES]["rows"]
    add_counts(ledger, run, counts)
    return staged


def extract_crm_to_ctms(cfg, run: dict, ctms, crm, ledger: Ledger | None = None) -> dict:
    ledger = ledger or Ledger()
    if not run["active"]:
        return {}
    ids = ledger.quarantined_ids(cfg.name, run["direction"], cfg.crm.call.object)
    staged = extract.extract_crm_to_ctms(cfg, ctms, crm, window_of(run), run["run_dir"], ids)
    add_counts(ledger, run, {cfg.crm.call.object: {"extracted": staged[extract.CALLS]["rows"],
                                                   "deleted": staged[extract.DELETED_CALLS]["rows"]}})
    return staged


# ---------------------------------------------------------------- validate


def validate(cfg, run: dict, staged: dict, ledger: Ledger | None = None) -> dict:
    """Run the GX suites, quarantine failing rows with reasons, stage the good rows.

    Returns {"good": {path, rows}, "report": data docs path, "summary": json path, ...}.
    Raises QualityThresholdExceeded (after recording everything) when too many rows fail.
    """
    ledger = ledger or Ledger()
    if not run["active"]:
        return {}
    quality = _quality()
    import pandas as pd

    outbound = run["direction"] == CTMS_TO_CRM
    if outbound:
        source_name, object_name = extract.CLINICAL_ACTIVITIES, cfg.ctms.activity.object
        rules = quality.outbound_rules(cfg)
        accounts = staging.read_frame(staged[extract.ACCOUNTS]["path"])
        known_studies = set(staging.read_frame(staged.get(extract.KNOWN_STUDIES, {}).get("path"))
                            .get("external_id", pd.Series(dtype=object)))
        known_sites = set(staging.read_frame(staged.get(extract.KNOWN_SITES, {}).get("path"))
                          .get("external_id", pd.Series(dtype=object)))
        make_checks = lambda chunk: quality.activity_checks(chunk, accounts, known_studies, known_sites, cfg)  # noqa: E731
        target_column = "account_id"
    else:
        source_name, object_name = extract.CALLS, cfg.crm.call.object
        rules = quality.inbound_rules(cfg)
        persons = staging.read_frame(staged[extract.PERSONS]["path"])
        make_checks = lambda chunk: quality.call_checks(chunk, persons, cfg)  # noqa: E731
        target_column = "person_id"

    validator = quality.Validator(cfg.name, run["dag_run_id"])
    good = staging.FrameWriter(f"{run['run_dir']}/{source_name}.valid.parquet")
    rows = failing = 0
    # Records quarantined by earlier runs are re-checked every run (held_before). While they still
    # fail, those a successful run already accepted are known open items, not new defects of this
    # window: the failing share that can fail the run counts the other rows only.
    held_before = set(ledger.quarantined_ids(cfg.name, run["direction"], object_name))
    accepted = ledger.accepted_quarantine_ids(cfg.name, run["direction"], object_name)
    new_rows = new_failing = 0
    reason_counts: dict[str, int] = {}
    suites: list[dict] = []
    seen = staging.IdSet()
    ledger.clear_outcomes(run["run_id"], object_name, only=["quarantined", "source_deleted"])  # a retry starts over
    for chunk in staging.read_chunks(staged[source_name]["path"]):
        # a quarantined record may also have changed in the window: keep one copy
        chunk = chunk[~seen.isin(chunk["id"])].drop_duplicates("id", keep="last")
        seen.add(chunk["id"])
        if chunk.empty:
            continue
        checks = make_checks(chunk)
        suites += validator.validate(object_name, checks, rules)
        reasons, per_rule = quality.row_reasons(checks, rules)
        for name, count in per_rule.items():
            reason_counts[name] = reason_counts.get(name, 0) + count
        bad = reasons.map(bool)
        rows += len(chunk)
        failing += int(bad.sum())
        new = ~chunk["id"].isin(accepted)
        new_rows += int(new.sum())
        new_failing += int((bad & new).sum())
        held = {str(checks.at[i, "source_id"]): reasons[i] for i in checks.index[bad]}
        ledger.quarantine_records(run["run_id"], cfg.name, run["direction"], object_name, held)
        ledger.add_outcomes(run["run_id"], cfg.name, run["direction"], object_name,
                            [{"source_id": s, "outcome": "quarantined", "message": "; ".join(r)}
                             for s, r in held.items()])
        good.write(chunk[~bad].assign(**{target_column: checks.loc[~bad, target_column]}))
        # A GX validation leaves reference cycles that Python's collector reaches late; collected
        # per chunk, the step's peak at 1,000,000 rows fell from 822 to 658 MiB (in-process), for
        # ~0.35 s a chunk (every tracked object of the process is walked).
        gc.collect()
    good_file = good.close()
    feature_on = cfg.features.clinical_activities if outbound else cfg.features.medical_activities
    gone = sorted(seen.missing(held_before)) if feature_on else []
    if gone:  # read again by id and not found: deleted in the source, nothing left to send
        ledger.resolve_quarantine(cfg.name, run["direction"], object_name, gone)
        ledger.add_outcomes(run["run_id"], cfg.name, run["direction"], object_name,
                            [{"source_id": s, "outcome": "source_deleted",
                              "message": "quarantined record no longer exists in the source vault"} for s in gone])
        log.info("%d quarantined %s records no longer exist in the source: quarantine closed", len(gone), object_name)
    report = validator.build_docs() if suites else None
    passed = not new_failing or new_failing / new_rows <= cfg.quality.max_failing_share
    summary = {"connection": cfg.name, "direction": run["direction"], "dag_run_id": run["dag_run_id"],
               "window_start": run["window_start"], "window_end": run["window_end"], "object": object_name,
               "rows": rows, "failing_rows": failing, "new_rows": new_rows, "new_failing_rows": new_failing,
               "reasons": reason_counts, "suites": suites,
               "max_failing_share": cfg.quality.max_failing_share, "passed": passed, "data_docs": report}
    summary_path = quality.write_summary(cfg.name, run["direction"], run["dag_run_id"], summary)
    ledger.add_dq_summary(run["run_id"], cfg.name, run["direction"], object_name, rows, failing, reason_counts,
                          passed, report)
    add_counts(ledger, run, {object_name: {"quarantined": failing, "valid": rows - failing}}, dq_report=report)
    log.info("data quality of %s: %d rows, %d quarantined %s; Data Docs: %s; summary: %s",
             object_name, rows, failing, reason_counts, report, summary_path)
    quality.check_threshold(new_rows, new_failing, cfg.quality.max_failing_share)
    return {"good": good_file, "report": report, "summary": summary_path, "rows": rows, "quarantined": failing}


# ---------------------------------------------------------------- transform


def transform(cfg, run: dict, staged: dict, validated: dict) -> dict:
    """Apply the field rules; stage the target records (one file per target object)."""
    if not run["active"]:
        return {}
    from clinical_crm import transform as rules
    import pandas as pd

    def records_file(name: str, frames, columns=None) -> dict:
        return staging.write_frames(f"{run['run_dir']}/{name}.records.parquet", frames, columns)

    out: dict[str, dict] = {}
    if run["direction"] == CTMS_TO_CRM:
        if extract.STUDIES in staged:
            out["clinical_studies"] = records_file("clinical_studies", (
                pd.DataFrame(rules.clinical_studies(c, cfg)) for c in staging.read_chunks(staged[extract.STUDIES]["path"])))
            out["clinical_sites"] = records_file("clinical_sites", (
                pd.DataFrame(rules.clinical_sites(c, cfg)) for c in staging.read_chunks(staged[extract.STUDY_SITES]["path"])))
        out["clinical_interactions"] = records_file("clinical_interactions", (
            pd.DataFrame(rules.clinical_interactions(c, cfg)) for c in staging.read_chunks(validated["good"]["path"])))
    else:
        out["medical_activities"] = records_file("medical_activities", (
            pd.DataFrame(rules.medical_activities(c, cfg)) for c in staging.read_chunks(validated["good"]["path"])))
    return out


# ---------------------------------------------------------------- load


def _load_object(ledger: Ledger, run: dict, client, target_object: str, source_object: str, staged: dict | None,
                 id_param: str, batch_size: int, resolve: bool, prepare=None) -> dict:
    """Upsert one staged records file chunk by chunk (memory follows the chunk, not the file);
    record outcomes, the id map and (for activities) the quarantine they leave. Records older than
    a version another run already wrote are not sent (outcome superseded, see load.upsert).

    Three stages overlap, each in order: this thread reads and prepares chunk i+1 while a writer
    thread upserts chunk i and a ledger thread records chunk i-1, so the vault's time hides the
    local work (at most three chunks in memory)."""
    from concurrent.futures import ThreadPoolExecutor

    from clinical_crm import load

    # failure counts always present: a retried load's counts then replace the failed attempt's
    # in the run's ledger row (add_counts merges key by key)
    totals: dict[str, int] = dict.fromkeys(("failed", "transient_failed", "permission_denied"), 0)

    def record(outcomes: list[dict]) -> None:
        ledger.add_outcomes(run["run_id"], run["connection"], run["direction"], source_object, outcomes)
        loaded = [o for o in outcomes if o["outcome"] in load.LOADED]
        ledger.map_ids(run["connection"], target_object,
                       [{"source_id": o["source_id"], "target_id": o["target_id"], "external_id": o["external_id"]}
                        for o in loaded])
        if resolve:
            ledger.resolve_quarantine(run["connection"], run["direction"], source_object,
                                      [o["source_id"] for o in loaded])
        failed = [o for o in outcomes if o["outcome"] == "failed"]
        for o in failed[:20]:
            log.warning("%s %s failed: %s %s", source_object, o["source_id"], o.get("error_type"), o.get("message"))
        transient = [o for o in failed if o.get("error_type") in TRANSIENT_RECORD_ERRORS]
        if resolve:
            # a record the target vault refuses stays visible and is tried again by every run
            ledger.quarantine_records(run["run_id"], run["connection"], run["direction"], source_object, {
                o["source_id"]: [f"{target_object} refused the record: {o.get('error_type')}: {o.get('message') or ''}".rstrip(": ")]
                for o in failed if o not in transient})
        for key, value in load.tally(outcomes).items():
            totals[key] = totals.get(key, 0) + value
        if transient:
            totals["transient_failed"] = totals.get("transient_failed", 0) + len(transient)
        denied = [o for o in failed if o.get("error_type") == "INSUFFICIENT_ACCESS"]
        if denied:
            totals["permission_denied"] = totals.get("permission_denied", 0) + len(denied)

    # the version check runs in the writer thread, per batch right before and after its call (the
    # smallest window between the check and the write); outcomes follow in the ledger thread
    guard = load.VersionGuard(ledger, run["connection"], run["direction"], source_object, run["run_id"])
    recorded = []
    with ThreadPoolExecutor(1, thread_name_prefix="load-write") as writer, \
            ThreadPoolExecutor(1, thread_name_prefix="load-ledger") as recorder:
        pending = None
        for chunk in staging.read_chunks((staged or {}).get("path"), chunk_rows=batch_size * 20):
            records = staging.records(chunk)
            if prepare is not None:
                records = [prepare(r) for r in records]
            if pending is not None:
                recorded.append(recorder.submit(record, pending.result()))
            for done in [f for f in recorded if f.done()]:
                done.result()  # a ledger failure stops the load here, as it would have in line
            pending = writer.submit(load.upsert, client, target_object, records, id_param, batch_size, guard=guard)
        if pending is not None:
            recorded.append(recorder.submit(record, pending.result()))
        for f in recorded:
            f.result()
    return totals


# Per-record errors a later attempt can clear (the client already re-sent these records a few
# times): the load task fails after writing everything else, so Airflow retries it; the upserts
# by external id make the retry safe.
TRANSIENT_RECORD_ERRORS = ("RACE_CONDITION", "UNEXPECTED_ERROR")


def _retry_transient(counts: dict[str, dict]) -> None:
    """After every outcome is in the ledger: records refused for lack of permission fail the task
    at once (VaultPermissionError: no retries); transient refusals fail it to be retried."""
    from clinical_crm.errors import VaultPermissionError, VaultTransientError

    denied = {obj: c["permission_denied"] for obj, c in counts.items() if c.get("permission_denied")}
    if denied:
        raise VaultPermissionError("INSUFFICIENT_ACCESS", f"the vault refused records of {denied} for lack of "
                                   f"permission; each record's outcome and the vault's message are in the ledger. "
                                   f"Give the integration user the missing permission, then re-run")
    left = {obj: c["transient_failed"] for obj, c in counts.items() if c.get("transient_failed")}
    if left:
        raise VaultTransientError("RACE_CONDITION", f"records refused with a transient error after the client's "
                                  f"re-sends ({left}); the load task is retried (upserts are idempotent)")


def load_ctms_to_crm(cfg, run: dict, crm, staged: dict, records: dict, ledger: Ledger | None = None) -> dict:
    """Studies, then Sites, then interactions; then the deletion markers."""
    ledger = ledger or Ledger()
    if not run["active"]:
        return {}
    from clinical_crm import load

    for obj in (cfg.ctms.study.object, cfg.ctms.site.object, cfg.ctms.activity.object):
        ledger.clear_outcomes(run["run_id"], obj, only=LOAD_OUTCOMES)  # a retried task starts over
    counts: dict[str, dict] = {}
    c = cfg.crm
    if "clinical_studies" in records:
        counts[cfg.ctms.study.object] = _load_object(
            ledger, run, crm, c.clinical_study.object, cfg.ctms.study.object, records["clinical_studies"],
            c.clinical_study.fields.external_id, cfg.load.batch_size, False)
        counts[cfg.ctms.site.object] = _load_object(
            ledger, run, crm, c.clinical_site.object, cfg.ctms.site.object, records["clinical_sites"],
            c.clinical_site.fields.external_id, cfg.load.batch_size, False)
    counts[cfg.ctms.activity.object] = _load_object(
        ledger, run, crm, c.interaction.object, cfg.ctms.activity.object, records.get("clinical_interactions"),
        c.interaction.fields.external_id, cfg.load.batch_size, True)

    # deletions: the global ids of deleted CTMS records are the external ids of their CRM records
    deletions = [(extract.DELETED_ACTIVITIES, cfg.ctms.activity.object,
                  lambda gids: load.mark_deleted_interactions(cfg, crm, gids))]
    if extract.DELETED_STUDIES in staged:
        deletions += [
            (extract.DELETED_STUDIES, cfg.ctms.study.object, lambda gids: load.mark_deleted_status(cfg, crm, "clinical_study", gids)),
            (extract.DELETED_SITES, cfg.ctms.site.object, lambda gids: load.mark_deleted_status(cfg, crm, "clinical_site", gids)),
        ]
    for key, source_object, apply in deletions:
        if key not in staged:
            continue
        gids = dict((g, i) for i, g in _pairs(staged[key], (extract.ID, extract.GLOBAL_ID)))
        if not gids:
            continue
        outcomes = [o | {"source_id": gids.get(o["source_id"], o["source_id"])} for o in apply(list(gids))]
        ledger.add_outcomes(run["run_id"], cfg.name, run["direction"], source_object, outcomes)
        counts.setdefault(source_object, {})["deletions_applied"] = sum(o["outcome"] == "marked_deleted" for o in outcomes)
        counts[source_object]["deletions_already_applied"] = sum(o["outcome"] == "unchanged" for o in outcomes)
    add_counts(ledger, run, counts)
    _retry_transient(counts)
    return counts


def load_crm_to_ctms(cfg, run: dict, ctms, staged: dict, records: dict, ledger: Ledger | None = None) -> dict:
    """Medical Activities; then deleted calls inactivate theirs."""
    ledger = ledger or Ledger()
    if not run["active"]:
        return {}
    from clinical_crm import load

    ledger.clear_outcomes(run["run_id"], cfg.crm.call.object, only=LOAD_OUTCOMES)
    a = cfg.ctms.activity

    def yes_no(record: dict) -> dict:  # staged as text; Complete is a Yes/No field
        return record | {a.fields.complete: record.get(a.fields.complete) == "true"}

    counts = {cfg.crm.call.object: _load_object(
        ledger, run, ctms, a.object, cfg.crm.call.object, records.get("medical_activities"), a.fields.external_id,
        cfg.load.batch_size, True, prepare=yes_no)}
    gids = dict((g, i) for i, g in _pairs(staged.get(extract.DELETED_CALLS), (extract.ID, extract.GLOBAL_ID)))
    if gids:
        outcomes = [o | {"source_id": gids.get(o["source_id"], o["source_id"])}
                    for o in load.inactivate_medical_activities(cfg, ctms, list(gids))]
        ledger.add_outcomes(run["run_id"], cfg.name, run["direction"], cfg.crm.call.object, outcomes)
        counts[cfg.crm.call.object]["deletions_applied"] = sum(o["outcome"] == "marked_deleted" for o in outcomes)
        counts[cfg.crm.call.object]["deletions_already_applied"] = sum(o["outcome"] == "unchanged" for o in outcomes)
    add_counts(ledger, run, counts)
    _retry_transient(counts)
    return counts


def _pairs(staged: dict | None, columns: tuple[str, str] = (extract.GLOBAL_ID, extract.ID)) -> list[tuple[Any, Any]]:
    pairs = []
    for chunk in staging.read_chunks((staged or {}).get("path")):
        pairs += list(zip(chunk[columns[0]], chunk[columns[1]]))
    return pairs
