"""What happened to one record in a run: the outcome vocabulary, once, and a record's result.

The ledger stores an outcome per record per run (`record_outcomes.outcome`); the runner, the
load, reconciliation, the pre-step and the page all speak of these values. `Outcome` is a
`StrEnum`, so a member equals its text ("created" == Outcome.CREATED) and code still holding
plain strings, or rows read back from the ledger, compare as before. A rules-layer module: it
imports nothing from the engine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    CREATED = "created"  # the target record was made
    UPDATED = "updated"  # the target record was changed
    UNCHANGED = "unchanged"  # the target already held these values (a deletion mark: already marked)
    FAILED = "failed"  # the vault refused the record (error_type, message say why)
    MARKED_DELETED = "marked_deleted"  # the target record got its deletion mark
    SUPERSEDED = "superseded"  # not sent: a newer version of the record was written already
    UNKNOWN = "unknown"  # sent without an answer: the vault may have applied it
    QUARANTINED = "quarantined"  # held back by the quality rules
    SOURCE_DELETED = "source_deleted"  # deleted in the source: its deletion mark is queued
    NEEDS_PERSON = "needs_person"  # an automated activity with no person to log it on


# Written to the target, or found holding the values already
LOADED = (Outcome.CREATED, Outcome.UPDATED, Outcome.UNCHANGED)
# What the load writes for a record
LOAD_OUTCOMES = (Outcome.CREATED, Outcome.UPDATED, Outcome.UNCHANGED, Outcome.FAILED,
                 Outcome.MARKED_DELETED, Outcome.SUPERSEDED, Outcome.UNKNOWN)
# A retried load clears its outcomes first (one per record per run), except marked_deleted: a
# mark written is never written again (the deletion queue), so it stays with the attempt that wrote it
CLEARED_ON_RETRY = tuple(o for o in LOAD_OUTCOMES if o is not Outcome.MARKED_DELETED)
# Written by an earlier attempt of the run (or sent without an answer): a retried load keeps
# them as the outcome that counted when the retry finds the target already holding the values
WRITTEN_OR_SENT = (Outcome.CREATED, Outcome.UPDATED, Outcome.MARKED_DELETED, Outcome.UNKNOWN)
# What validation writes (a retried validation clears them first)
VALIDATION_OUTCOMES = (Outcome.QUARANTINED, Outcome.SOURCE_DELETED)
# A deletion mark that is in place: written now, or found already there
MARK_APPLIED = (Outcome.MARKED_DELETED, Outcome.UNCHANGED)


@dataclass(frozen=True)
class RecordResult:
    """One record's outcome in a run, as the ledger stores it (`source_id` names the source
    record; `target_id` / `external_id` the target record when there is one)."""

    source_id: str
    outcome: Outcome
    target_id: str | None = None
    external_id: str | None = None
    error_type: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:  # accept plain text: "created" -> Outcome.CREATED
        object.__setattr__(self, "source_id", str(self.source_id))
        object.__setattr__(self, "outcome", Outcome(self.outcome))

    def as_dict(self) -> dict[str, Any]:
        """The outcome dict the code passed around before (outcome as plain text)."""
        return asdict(self) | {"outcome": self.outcome.value}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RecordResult:
        """From an outcome dict; keys that are not fields (e.g. warnings) are left out."""
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})
