"""What a Flow declares: the pieces the runner (clinical_crm.engine.runner) executes, in order,
for any direction. A flow module builds one `Flow` from these and names its own rules; the
runner and the DAG factory never look inside a direction.

Parts that depend on the connection file take `cfg` (clinical_crm.config.ConnectionConfig): API
names live in configuration, never in code.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Cfg = Any  # clinical_crm.config.ConnectionConfig (not imported: flows load at DAG parse time)


@dataclass(frozen=True)
class PreStep:
    """A step before extraction (e.g. automated Clinical Activities): it writes to the source
    vault and returns the ids of source records the extraction must read whatever their
    modification time, and counts per object."""

    task_id: str
    enabled: Callable[[Cfg], bool]
    run: Callable[..., tuple[list[str], dict[str, dict]]]  # (cfg, source client, ledger, run) -> (ids, counts)


@dataclass(frozen=True)
class Extraction:
    """What a run reads. `stage(cfg, clients, window, run_dir, reread_ids, ledger)` stages named
    files; `counts` names, per staged file, the object and the count it feeds."""

    stage: Callable[..., dict]
    counts: Callable[[Cfg], dict[str, tuple[str, str]]]  # staged name -> (object, count key)


@dataclass(frozen=True)
class Validation:
    """The data-quality gate: the rows of `source` (staged name) of `source_object` are checked
    by `rules`; `checks(chunk, reference, cfg)` builds the check frame (with `matched_column`
    holding the matched target record's id); `reference(staged, cfg)` loads what the checks
    compare against (accounts, persons, known studies) once per run."""

    source: str
    source_object: Callable[[Cfg], str]
    feature: Callable[[Cfg], bool]
    rules: Callable[[Cfg], list]
    reference: Callable[..., Any]
    checks: Callable[..., Any]
    matched_column: str


@dataclass(frozen=True)
class Target:
    """One target object: records built by `build(chunk, cfg)` from the rows of `source` (a
    staged name; VALID = the rows that passed validation), upserted by `id_param`. The rows of
    the validated object hold their quarantine: a refused record is quarantined, a written one
    released. `prepare` turns a staged text value into what the target field takes. `where`:
    which records of the target object are this target's (reconciliation reads them all)."""

    records: str
    source: str
    source_object: Callable[[Cfg], str]
    target_object: Callable[[Cfg], str]
    id_param: Callable[[Cfg], str]
    build: Callable[..., list[dict]]
    enabled: Callable[[Cfg], bool] = lambda cfg: True
    holds_quarantine: bool = False
    prepare: Callable[[dict, Cfg], dict] | None = None
    where: Callable[[Cfg], str | None] = lambda cfg: None


@dataclass(frozen=True)
class DeletionMark:
    """How a deleted source record (ids staged as `staged`) marks its target record, found by
    external id = the source's global id: `change(target row, cfg)` gives the fields to write.
    Never creates a record; applied once (see engine.load.mark_deleted). `carried(target row,
    cfg)`: does the row carry the mark (reconciliation, when the ledger holds no written value);
    None: the row already holds what `change` gives (a status)."""

    staged: str
    source_object: Callable[[Cfg], str]
    target_object: Callable[[Cfg], str]
    external_id: Callable[[Cfg], str]
    read_fields: Callable[[Cfg], list[str]]
    change: Callable[[dict, Cfg], dict]
    already_message: str
    where: Callable[[Cfg], str | None] = lambda cfg: None
    enabled: Callable[[Cfg], bool] = lambda cfg: True
    carried: Callable[[dict, Cfg], bool] | None = None


@dataclass(frozen=True)
class Flow:
    """One direction of the connection, declared: the runner does the rest."""

    name: str                 # DAG id prefix and the ledger's direction, e.g. "ctms_to_crm"
    source_side: str          # "ctms" | "crm": the vault read
    target_side: str          # the vault written
    describe: Callable[[Cfg], str]  # what the DAG does, for its doc
    extraction: Extraction
    validation: Validation
    targets: tuple[Target, ...]
    deletions: tuple[DeletionMark, ...] = ()
    pre_step: PreStep | None = None

    def conn_id(self, cfg: Cfg, side: str) -> str:
        """The Airflow connection id of one side's vault."""
        return {"ctms": cfg.ctms_conn_id, "crm": cfg.crm_conn_id}[side]


VALID = "valid"  # Target.source of the rows that passed validation
# Carried with each target record from transform to load, never sent: the source record's id
# (outcomes are recorded against it without an id map in memory) and its modified_date__v as
# extracted (the load skips a version older than one another run already wrote).
SOURCE_ID = "_source_id"
SOURCE_VERSION = "_source_version"


def target_records(rows, external_id_field: str, fields: Callable[[dict], dict]) -> list[dict]:
    """Staged source rows as target records: keyed by the source's global id (the upsert's
    idParam), carrying the source id and version, with the fields `fields(row)` maps."""
    from clinical_crm.engine.staging import records
    from clinical_crm.values import text
    from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE

    return [{SOURCE_ID: row[ID], SOURCE_VERSION: text(row.get(MODIFIED_DATE)), external_id_field: row[GLOBAL_ID],
             **fields(row)} for row in records(rows)]
