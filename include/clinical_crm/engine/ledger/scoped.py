"""The ledger seen from one source object of one flow: the API the engine uses.

Most ledger writes name one source record of a connection and flow, so the Ledger's methods
take the triple (connection, direction, object). A step scopes the ledger once,
`ledger.scope(connection, direction, object_name)`, and calls these without it;
`ledger.id_map(connection, target_object)` does the same for the id map, which is keyed by the
target object. Each method hands over to the Ledger's: one implementation of every operation.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from clinical_crm.outcomes import RecordResult

if TYPE_CHECKING:
    from clinical_crm.engine.ledger import Ledger


@dataclass(frozen=True)
class ObjectLedger:
    """The ledger of one source object: outcomes, quarantine, versions and deletion queue."""

    ledger: Ledger
    connection: str
    direction: str  # the flow
    object_name: str  # the source object

    @property
    def _key(self) -> tuple[str, str, str]:
        return self.connection, self.direction, self.object_name

    # outcomes and source versions
    def add_outcomes(self, run_id: int, outcomes: Iterable[RecordResult | dict]) -> None:
        self.ledger.add_outcomes(run_id, *self._key, outcomes)

    def loaded_versions(self, source_ids: Iterable[str]) -> dict[str, datetime]:
        """The stored versions of these records ({source id: version} works too: its keys)."""
        return self.ledger.loaded_versions(*self._key, source_ids)

    def record_versions(self, versions: dict[str, datetime], run_id: int | None = None) -> None:
        self.ledger.record_versions(*self._key, versions, run_id=run_id)

    def add_dq_summary(self, run_id: int, rows: int, failing_rows: int, reasons: dict[str, int],
                       success: bool, report_path: str | None) -> None:
        self.ledger.add_dq_summary(run_id, *self._key, rows, failing_rows, reasons, success, report_path)

    # quarantine
    def quarantine_records(self, run_id: int, held: dict[str, list[str]]) -> None:
        """Hold records back: {source id: reasons}."""
        self.ledger.quarantine_records(run_id, *self._key, held)

    def resolve_quarantine(self, source_ids: Iterable[str]) -> int:
        return self.ledger.resolve_quarantine(*self._key, source_ids)

    def quarantined_ids(self) -> list[str]:
        return self.ledger.quarantined_ids(*self._key)

    def accepted_quarantine_ids(self) -> set[str]:
        return self.ledger.accepted_quarantine_ids(*self._key)

    # deletion queue
    def queue_deletions(self, deleted: Iterable[tuple[str, str]], run_id: int | None = None) -> int:
        """Queue (source id, global id) pairs; returns how many were new."""
        return self.ledger.queue_deletions(*self._key, deleted, run_id=run_id)

    def pending_deletions(self) -> list[dict]:
        return self.ledger.pending_deletions(*self._key)

    def expect_deletions(self, expected: dict[str, dict]) -> None:
        """{source id: the values about to be written as its mark}."""
        self.ledger.expect_deletions(*self._key, expected)

    def settle_deletions(self, outcomes: Iterable[RecordResult | dict], no_target: Iterable[str] = (),
                         run_id: int | None = None) -> None:
        self.ledger.settle_deletions(*self._key, outcomes, no_target=no_target, run_id=run_id)

    def deletion_entries(self) -> dict[str, dict]:
        return self.ledger.deletion_entries(*self._key)


@dataclass(frozen=True)
class IdMap:
    """The id map of one target object of a connection (source id -> target id / external id)."""

    ledger: Ledger
    connection: str
    target_object: str

    def map_ids(self, rows: Iterable[dict]) -> None:
        """Rows with source_id, target_id, external_id (a RecordResult's as_dict() will do)."""
        self.ledger.map_ids(self.connection, self.target_object, rows)

    def known_external_ids(self, external_ids: Iterable[str]) -> set[str]:
        return self.ledger.known_external_ids(self.connection, self.target_object, external_ids)
