"""Reconciliation: what the target vault should hold, computed from EVERY source record by the
flow's own rules, compared record by record with what it holds; each difference (drift) goes
to the ledger (`drift`, `reconcile_runs`) and, with repair, the newest version is re-sent.

This module owns the comparison, the drift kinds and the repair. It works from the Flow
declarations only (no direction is named here):

* source: the flow's own reads (engine.plan) over the whole history instead of a window, then
  the flow's quality checks: a record failing them is expected absent
  (quarantined), never drift; the valid rows become target records by `runner.transform`, i.e.
  by each `Target.build` (and `prepare`, as the load sends them);
* target: every record of the target object (`Target.where`) carrying an external id of this
  source vault (`{vault id}_...`), paged;
* deletions: a target record with no source record in that read, and none found by its global
  id either (a record changed since the read, or no longer selected, e.g. a call unflagged, is
  no deletion: the connection leaves those alone), lost its source. It is a deletion the
  connection must mark when the ledger's deletion queue, the vault's recent deletions (staged
  by the extraction) or the ledger's id map (the connection wrote it) know the record;
  `DeletionMark.carried` (or the value the ledger says the mark wrote) says whether the target
  carries the mark.

Drift kinds, per target record (external id = the source's global id):
  missing                a valid source record has no target record
  stale                  target fields differ from what the rules give (fields, both values)
  extra                  an external id of this source vault with no source record, which the
                         connection never wrote nor saw deleted; reported, never deleted
  missing_deletion_mark  the source record was deleted but the target lacks its mark

Repair (`repair=True`): missing and stale records are upserted (engine.load.upsert, with the
version guard), missing marks applied (engine.load.mark_deleted, recorded in the deletion
queue so no later run marks them again); each repaired drift row gets `repaired_at`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from clinical_crm.engine import load, quality, runner, staging
from clinical_crm.engine.context import RunContext, Staged
from clinical_crm.engine.ledger import Ledger
from clinical_crm.engine.plan import Reading
from clinical_crm.flows.base import SOURCE_ID, SOURCE_VERSION, VALID, DeletionMark, Flow, Target
from clinical_crm.values import text
from clinical_crm.vault import Query
from clinical_crm.vault.fields import GLOBAL_ID, ID

log = logging.getLogger(__name__)

KINDS = ("missing", "stale", "extra", "missing_deletion_mark")
RESENT = ("missing", "stale")
EVER = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the start of the "window" of every source record
SHOWN = 20  # drift rows written to the task log per target


def value(v) -> str | None:
    """A field value as compared: trimmed text, Yes/No as true/false, a picklist's first value."""
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    if isinstance(v, bool):
        return "true" if v else "false"
    return text(v)


@contextmanager
def _whole_history_deletions() -> Iterator[None]:
    """The extraction warns that deletions before Vault's 30 days cannot be read; over the whole
    history that is expected (reconciliation finds those by absence), so the warning is dropped."""
    logger = logging.getLogger("clinical_crm.engine.extract")
    drop = logging.Filter()
    drop.filter = lambda record: not str(record.msg).startswith("deletions of %s between")  # type: ignore[method-assign]
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# ---------------------------------------------------------------- the source side


def _valid_rows(flow: Flow, cfg, staged: Staged, run_dir: str) -> Staged:
    """The validated object's rows that pass the flow's quality rules (with the matched target
    id column), judged as the runner's validate step judges them, without touching the
    quarantine or the Data Docs (an ephemeral GX context)."""
    v = flow.validation
    if v is None:
        return Staged()
    reference = runner.references(v, staged)
    checked = quality.CheckedRows(staged.path(v.read), v.matched_column)
    verdict = checked.judge(quality.Validator(cfg.name, "reconcile", stored=False), v.object, v.rules,
                            lambda chunk: v.checks(chunk, reference))
    good = staging.FrameWriter(f"{run_dir}/{v.read}.valid.parquet")
    for chunk, bad in checked.chunks(verdict):
        good.write(chunk[~bad])
    return Staged({VALID: good.close()})


def _global_ids(path: str | None) -> dict[str, str]:
    """{global id: id} of a staged source file."""
    found: dict[str, str] = {}
    for chunk in staging.read_chunks(path):
        found.update(zip(map(str, chunk[GLOBAL_ID]), map(str, chunk[ID])))
    return found


def expected_records(target: Target, records: Staged) -> Iterator[dict]:
    """The records the load would send, from the target's staged records (streamed: memory
    follows the chunk)."""
    for chunk in staging.read_chunks(records.path(target.records)):
        for record in staging.records(chunk):
            yield target.prepare(record) if target.prepare is not None else record


def compared_fields(target: Target, records: Staged) -> list[str]:
    """The fields the target's records carry (the columns of its staged records)."""
    first = next(staging.read_chunks(records.path(target.records), chunk_rows=1), None)
    columns = set(first.columns) if first is not None else set()
    return sorted(columns - {SOURCE_ID, SOURCE_VERSION, target.id_param})


# ---------------------------------------------------------------- the target side


def target_records(client, target: Target, cfg, fields: list[str], prefix: str) -> dict[str, dict]:
    """{external id: record} of every target record carrying an external id of the source vault."""
    id_param = target.id_param
    query = Query.select(target.target_object, list(dict.fromkeys([ID, id_param, *fields])))
    where = target.where
    query = (query.filter(where) if where else query).paged(cfg.load.query_page_size)
    return {str(r[id_param]): r for page in client.query(query) for r in page.records
            if (text(r.get(id_param)) or "").startswith(prefix)}


def carries_mark(mark: DeletionMark, row: dict, entry: dict | None) -> bool:
    """Does the target row carry the deletion mark? It holds the values the connection wrote as
    the mark (the ledger's `expected`), or passes the mark's own test (`carried`, else: it holds
    what `change` gives)."""
    change = mark.change(row)
    current = {k: value(row.get(k)) for k in change}
    if entry and entry.get("expected") and current == {k: value(v) for k, v in entry["expected"].items()}:
        return True
    if mark.carried is not None:
        return mark.carried(row)
    return current == {k: value(v) for k, v in change.items()}


# ---------------------------------------------------------------- comparing


def differences(record: dict, row: dict, fields: list[str]) -> dict:
    """{field: {expected, actual}} where the target row differs from the record the load sends
    (an unset reference is not sent, so not compared)."""
    return {f: {"expected": value(record.get(f)), "actual": value(row.get(f))} for f in fields
            if not ("." in f and value(record.get(f)) is None) and value(record.get(f)) != value(row.get(f))}


class TargetCheck:
    """Reconciles one Target of one flow: `drift()` compares, `repair(drift)` re-sends."""

    def __init__(self, flow: Flow, target: Target, cfg, clients: dict, ledger: Ledger, staged: Staged,
                 records: Staged):
        self.flow, self.target, self.cfg, self.ledger = flow, target, cfg, ledger
        self.client, self.source_client = clients[flow.target_side], clients[flow.source_side]
        self.prefix = f"{clients[flow.source_side].vault_id}_"
        self.source_object, self.target_object = target.source_object, target.target_object
        self.id_param = target.id_param
        source = flow.validation.read if target.source == VALID and flow.validation else target.source
        self.sources = _global_ids(staged.path(source))  # valid or not: the source record exists
        self.records = records
        self.expected = 0  # records the source says the target holds, counted by drift()
        self.resend: dict[str, dict] = {}  # {external id: record} of the missing and stale ones
        self.marks = [m for m in flow.deletions if m.target_object == self.target_object
                      and m.source_object == self.source_object]
        self.deleted: dict[str, str] = {}  # {global id: source id} the vault reports deleted lately
        for mark in self.marks:
            self.deleted.update(_global_ids(staged.path(mark.staged)))
        self.entries = ledger.deletion_entries(cfg.name, flow.name, self.source_object)
        self.fields = compared_fields(target, records)
        read = self.fields + [f for m in self.marks for f in m.read_fields]
        self.actual = target_records(self.client, target, cfg, read, self.prefix)

    def source_id(self, external_id: str) -> str:
        entry = self.entries.get(external_id)
        return entry["source_id"] if entry else self.deleted.get(external_id, external_id.removeprefix(self.prefix))

    def drift(self) -> list[dict]:
        found = []
        for record in expected_records(self.target, self.records):
            self.expected += 1
            external_id = str(record[self.id_param])
            row = self.actual.get(external_id)
            diff = differences(record, row, self.fields) if row is not None else None
            if row is None or diff:
                self.resend[external_id] = record
                found.append({"kind": "stale" if diff else "missing", "external_id": external_id,
                              "source_id": str(record[SOURCE_ID]), "details": {"fields": diff} if diff else None})
        unmarked = [e for e, row in self.actual.items() if e not in self.sources and not any(
            carries_mark(m, row, self.entries.get(e)) for m in self.marks)]
        existing = self.still_there(unmarked) if unmarked else set()
        gone = [e for e in unmarked if e not in existing]
        written = self.ledger.known_external_ids(self.cfg.name, self.target_object, gone) if gone else set()
        for external_id in gone:
            known = external_id in self.entries or external_id in self.deleted or external_id in written
            mark = self.marks[0] if known and self.marks else None
            row = self.actual[external_id]
            found.append({"kind": "missing_deletion_mark" if mark else "extra", "external_id": external_id,
                          "source_id": self.source_id(external_id), "details": mark and {"fields": {  # type: ignore[dict-item]
                              k: {"expected": value(v), "actual": value(row.get(k))}
                              for k, v in mark.change(row).items()}}})
        return found

    def still_there(self, global_ids: list[str]) -> set[str]:
        """Which of these source records exist after all: changed since the full read, or no
        longer selected by the flow (e.g. a call whose flag was cleared) — neither is a deletion,
        and the connection leaves their target records alone."""
        query = Query.select(self.source_object, [GLOBAL_ID]).paged(self.cfg.load.query_page_size)
        return {str(r[GLOBAL_ID]) for chunk in query.contains(GLOBAL_ID, global_ids)
                for page in self.source_client.query(chunk) for r in page.records}

    def repair(self, found: list[dict]) -> list[str]:
        """Re-send what drifted (extra excepted); the external ids repaired."""
        repaired = self._resend([self.resend[d["external_id"]] for d in found if d["kind"] in RESENT])
        unmarked = [d for d in found if d["kind"] == "missing_deletion_mark"]
        if unmarked:
            repaired += self._mark(self.marks[0], unmarked)
        return repaired

    def _resend(self, records: list[dict]) -> list[str]:
        if not records:
            return []
        guard = load.VersionGuard(self.ledger, self.cfg.name, self.flow.name, self.source_object)
        with self.ledger.exclusive(load.lock_name(self.cfg.name, self.target_object)):
            outcomes = load.upsert(self.client, self.target_object, records, self.id_param, self.cfg.load.batch_size,
                                   guard=guard)
        loaded = [o for o in outcomes if o["outcome"] in load.LOADED]
        self.ledger.map_ids(self.cfg.name, self.target_object, [
            {"source_id": o["source_id"], "target_id": o["target_id"], "external_id": o["external_id"]} for o in loaded])
        _log_failures(self.target_object, [o for o in outcomes if o["outcome"] not in load.LOADED])
        return [o["external_id"] for o in loaded]

    def _mark(self, mark: DeletionMark, unmarked: list[dict]) -> list[str]:
        """Apply the mark as a run would, through the ledger's deletion queue (so it is applied once)."""
        name, direction, obj = self.cfg.name, self.flow.name, self.source_object
        self.ledger.queue_deletions(name, direction, obj, [(d["source_id"], d["external_id"]) for d in unmarked])
        pending = [{"source_id": d["source_id"], "global_id": d["external_id"],
                    "expected": (self.entries.get(d["external_id"]) or {}).get("expected")} for d in unmarked]
        outcomes, no_target = load.mark_deleted(
            self.client, mark, pending, self.cfg.load.batch_size,
            expect=lambda changes: self.ledger.expect_deletions(name, direction, obj, changes))
        self.ledger.settle_deletions(name, direction, obj, outcomes, no_target)
        _log_failures(self.target_object, [o for o in outcomes if o["outcome"] == "failed"])
        by_source = {d["source_id"]: d["external_id"] for d in unmarked}
        return [by_source[o["source_id"]] for o in outcomes if o["outcome"] in ("marked_deleted", "unchanged")]


def _log_failures(object_name: str, failed: list[dict]) -> None:
    for o in failed[:SHOWN]:
        log.warning("repair of %s %s: %s %s %s", object_name, o.get("external_id") or o["source_id"], o["outcome"],
                    o.get("error_type") or "", o.get("message") or "")


# ---------------------------------------------------------------- one flow


def reconcile(flow: Flow, cfg, clients: dict, dag_run_id: str, repair: bool = False, ledger: Ledger | None = None,
              now: datetime | None = None) -> dict:
    """Reconcile every enabled target of one flow of one connection. Returns the run's summary:
    {"run_id", "repair", "objects": {target object: {expected, in_target, <kind>: n, repaired}}}."""
    ledger = ledger or Ledger()
    run_id = ledger.start_reconcile(cfg.name, flow.name, dag_run_id, repair)
    ctx = RunContext(cfg.name, flow.name, dag_run_id, EVER.isoformat(), (now or datetime.now(timezone.utc)).isoformat(),
                     True, staging.run_dir(cfg.name, f"reconcile_{flow.name}", dag_run_id), run_id)
    objects: dict[str, dict] = {}
    try:
        with _whole_history_deletions():
            staged = Staged(Reading(flow.reads, clients, ctx.window, ctx.run_dir, cfg.load.concurrency, {},
                                    known=lambda obj, ids: ledger.known_external_ids(cfg.name, obj, ids),
                                    page_size=cfg.load.query_page_size).run())
        valid = _valid_rows(flow, cfg, staged, ctx.run_dir)
        records = runner.transform(flow, cfg, ctx, staged, valid)
        for target in flow.targets:
            check = TargetCheck(flow, target, cfg, clients, ledger, staged, records)
            objects[check.target_object] = _reconcile_target(check, ledger, run_id, repair)
    except BaseException as error:
        ledger.finish_reconcile(run_id, "failed", {"objects": objects}, f"{type(error).__name__}: {error}")
        raise
    finally:
        staging.remove_run(ctx.run_dir)
    summary = {"run_id": run_id, "repair": repair, "objects": objects}
    ledger.finish_reconcile(run_id, "success", summary)
    return summary


def _reconcile_target(check: TargetCheck, ledger: Ledger, run_id: int, repair: bool) -> dict:
    found = check.drift()
    ledger.add_drift(run_id, check.cfg.name, check.flow.name, check.target_object, found)
    counts = {"expected": check.expected, "in_target": len(check.actual), **dict.fromkeys(KINDS, 0)}
    for d in found:
        counts[d["kind"]] += 1
    if repair and found:
        repaired = check.repair(found)
        ledger.drift_repaired(run_id, check.target_object, repaired)
        counts["repaired"] = len(repaired)
    log.log(logging.WARNING if found else logging.INFO, "%s %s -> %s: %d expected, %d in the target; %s%s",
            check.flow.name, check.source_object, check.target_object, counts["expected"], counts["in_target"],
            ", ".join(f"{k} {counts[k]}" for k in KINDS),
            f"; repaired {counts['repaired']}" if "repaired" in counts else "")
    for d in found[:SHOWN]:
        log.info("  %s %s (source %s)%s", d["kind"], d["external_id"], d["source_id"],
                 "".join(f"; {f}: {c['actual']!r} should be {c['expected']!r}"
                         for f, c in ((d["details"] or {}).get("fields") or {}).items()))
    if len(found) > SHOWN:
        log.info("  ... and %d more (ledger: drift of run %s)", len(found) - SHOWN, run_id)
    return counts
