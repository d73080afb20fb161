"""What a flow declares, as plain values: what it reads, checks, writes and marks deleted.

A flow module exports `build(cfg: ConnectionConfig) -> Flow`, called once per step with the
connection file: every object and field API name is resolved then, and parts the file disables
are left out (nobody asks "is this enabled?" later). The engine (clinical_crm.engine) runs a
Flow; a flow imports nothing from the engine.

Reads are declared, not coded: the engine orders them by what each needs, runs the independent
ones side by side within `load.concurrency`, names their staged files and counts them
(clinical_crm.engine.plan). `Custom` is the one escape hatch for a read none of the others fits.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clinical_crm.values import text
from clinical_crm.vault import Query
from clinical_crm.vault.fields import GLOBAL_ID, ID, MODIFIED_DATE

if TYPE_CHECKING:
    import pandas as pd

    from clinical_crm.checks import Rule

VALID = "valid"  # Target.source of the rows that passed validation
# Carried with each target record from transform to load, never sent: the source record's id
# (outcomes are recorded against it without an id map in memory) and its modified_date__v as
# extracted (the load skips a version older than one another run already wrote).
SOURCE_ID = "_source_id"
SOURCE_VERSION = "_source_version"
# Carried by a pre-step's records when one write holds records of several source objects: the
# object the record's outcome belongs to.
SOURCE_OBJECT = "_source_object"


# ---------------------------------------------------------------- reads


@dataclass(frozen=True)
class Windowed:
    """Records of `object` changed in the run's window (ordered along the modified date), plus
    those read again by id whatever their modification time: quarantined before, or written by
    the pre-step (`reread`). `collects`: {value set: column}, values later reads look up."""

    name: str
    side: str
    object: str
    query: Query
    reread: bool = True
    collects: dict[str, str] = field(default_factory=dict)

    counted = "extracted"


@dataclass(frozen=True)
class Deleted:
    """The ids of `object`'s records deleted in the window, with the global id their target
    records carry (Vault keeps them 30 days)."""

    name: str
    side: str
    object: str

    counted = "deleted"


@dataclass(frozen=True)
class Lookup:
    """Records whose `field` holds one of the values collected into `values` by earlier reads
    (CONTAINS chunks read side by side). `page_aligned`: chunks sized so each fills whole pages."""

    name: str
    side: str
    query: Query
    field: str
    values: tuple[str, ...]
    page_aligned: bool = False

    counted = None


@dataclass(frozen=True)
class Referenced:
    """Records of `object` changed in the window, or referenced by global id (`references`:
    value sets collected by earlier reads) and not yet in the target's `target_object` (the
    ledger's id map says which are). Also stages `known`: every global id the target holds
    after this run's load (this run's records and the ledger's)."""

    name: str
    side: str
    object: str
    query: Query
    target_object: str
    references: tuple[str, ...]
    known: str
    collects: dict[str, str] = field(default_factory=dict)

    counted = "extracted"


@dataclass(frozen=True)
class Custom:
    """The escape hatch: `read(client, window, values)` yields frames of `columns` (values: the
    value sets this read `needs`, by name). Reads through the client only, like the others."""

    name: str
    side: str
    read: Callable[..., Iterable[pd.DataFrame]]
    columns: tuple[str, ...]
    needs: tuple[str, ...] = ()
    object: str | None = None
    counted: str | None = None
    collects: dict[str, str] = field(default_factory=dict)


Read = Windowed | Deleted | Lookup | Referenced | Custom


# ---------------------------------------------------------------- checks, writes, marks


@dataclass(frozen=True)
class Validation:
    """The data-quality gate over the rows of the read `read` (records of `object`): `checks(rows,
    reference)` builds the check frame that the `rules` (Great Expectations suites) validate;
    `reference` names the staged reads it compares against ({name: frame}, loaded once a run);
    `matched_column` holds the matched target record's id, kept with the valid rows."""

    read: str
    object: str
    rules: list[Rule]
    checks: Callable[[pd.DataFrame, dict[str, pd.DataFrame]], pd.DataFrame]
    reference: tuple[str, ...]
    matched_column: str


@dataclass(frozen=True)
class Upsert:
    """Where the load path writes: records of `source_object` upserted into `target_object` by
    `id_param`; with `holds_quarantine`, a refused record is quarantined, a written one released."""

    source_object: str
    target_object: str
    id_param: str
    holds_quarantine: bool = False


@dataclass(frozen=True)
class Target:
    """One target object: the records `build(rows)` makes from the rows of `source` (a read's
    name, or VALID: the rows that passed validation), upserted by `id_param`. With
    `holds_quarantine`, a refused record is quarantined and a written one released. `prepare`
    turns a staged text value into what the target field takes. `where`: which records of the
    target object are this target's (reconciliation reads them all)."""

    records: str
    source: str
    source_object: str
    target_object: str
    id_param: str
    build: Callable[[pd.DataFrame], list[dict]]
    holds_quarantine: bool = False
    prepare: Callable[[dict], dict] | None = None
    where: str | None = None

    @property
    def upsert(self) -> Upsert:
        return Upsert(self.source_object, self.target_object, self.id_param, self.holds_quarantine)


@dataclass(frozen=True)
class DeletionMark:
    """How a deleted source record (ids staged by the read `staged`) marks its target record,
    found by `external_id` = the source's global id: `change(target row)` gives the fields to
    write (`read_fields` are read first). Never creates a record; applied once (engine.load).
    `carried(target row)`: does the row carry the mark (reconciliation, when the ledger holds no
    written value); None: the row holds what `change` gives (a status)."""

    staged: str
    source_object: str
    target_object: str
    external_id: str
    read_fields: list[str]
    change: Callable[[dict], dict]
    already_message: str
    where: str | None = None
    carried: Callable[[dict], bool] | None = None


@dataclass(frozen=True)
class Note:
    """An outcome the flow reports for a source record it does not write (e.g. `needs_person`)."""

    source_object: str
    source_id: str
    outcome: str
    message: str


@dataclass(frozen=True)
class Writes:
    """What a pre-step wants written to its vault, in one upsert of `object` by `id_param`: each
    record carries SOURCE_ID and SOURCE_OBJECT. After the write, `then(written)` ({source object:
    source ids written}) gives the updates to make next ({object: [records with id]}), and `notes`
    are recorded as they are."""

    object: str
    id_param: str
    records: list[dict]
    then: Callable[[dict[str, list[str]]], dict[str, list[dict]]]
    notes: list[Note] = field(default_factory=list)
    counted: dict[str, int] = field(default_factory=dict)  # {source object: records read}

    @property
    def upsert(self) -> Upsert:
        """Into the pre-step's own vault: the records are both read from and written to `object`'s
        side; outcomes are kept per source object (the runner's `object_of`)."""
        return Upsert(self.object, self.object, self.id_param)


@dataclass(frozen=True)
class PreStep:
    """A step before extraction (e.g. automated Clinical Activities): `plan(client)` reads the
    source vault and returns the Writes; the engine writes them through the load path and hands
    the ids written to the extraction, which reads them whatever their modification time."""

    task_id: str
    plan: Callable[[Any], Writes]
    source_objects: tuple[str, ...]
    object: str  # what its Writes upsert (preflight checks the user may create and edit it)


@dataclass(frozen=True)
class Flow:
    """One direction of one connection, declared: the engine does the rest."""

    name: str                 # DAG id prefix and the ledger's direction, e.g. "ctms_to_crm"
    source_side: str          # "ctms" | "crm": the vault read
    target_side: str          # the vault written
    conn_ids: dict[str, str]  # {side: Airflow connection id}
    description: str          # what the DAG does, for its doc
    reads: tuple[Read, ...]
    targets: tuple[Target, ...]
    validation: Validation | None = None
    deletions: tuple[DeletionMark, ...] = ()
    pre_step: PreStep | None = None

    def conn_id(self, side: str) -> str:
        return self.conn_ids[side]

    def read(self, name: str) -> Read:
        return next(r for r in self.reads if r.name == name)

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides the extraction reads."""
        return tuple(dict.fromkeys(r.side for r in self.reads))


def frame_rows(frame) -> list[dict]:
    """The rows of a frame as dicts, like `frame.to_dict("records")` (same values) but column-wise
    in C: about 4 x faster on the staged text frames, which transform and load walk row by row."""
    columns = list(frame.columns)
    return [dict(zip(columns, values)) for values in zip(*(frame[c].tolist() for c in columns))]


def target_records(rows, external_id_field: str, fields: Callable[[dict], dict]) -> list[dict]:
    """Staged source rows as target records: keyed by the source's global id (the upsert's
    idParam), carrying the source id and version, with the fields `fields(row)` maps."""
    return [{SOURCE_ID: row[ID], SOURCE_VERSION: text(row.get(MODIFIED_DATE)), external_id_field: row[GLOBAL_ID],
             **fields(row)} for row in frame_rows(rows)]


def known_ids(frame) -> set[str]:
    """The global ids of a `Referenced` read's `known` frame."""
    return set(frame["external_id"]) if frame is not None and "external_id" in frame else set()
