"""Typed answers of the Vault REST API: the envelope, its warnings, the API limit headers,
query pages and per-record write outcomes. Plain dataclasses, so callers never dig in dicts."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NO_DATA_CHANGES = "NO_DATA_CHANGES"


@dataclass(frozen=True)
class VaultWarning:
    type: str
    message: str = ""

    @classmethod
    def all_of(cls, body: Mapping) -> tuple[VaultWarning, ...]:
        return tuple(cls(str(w.get("warning_type") or w.get("type") or "UNKNOWN"), str(w.get("message") or ""))
                     for w in body.get("warnings") or [] if isinstance(w, Mapping))


def _number(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    digits = re.sub(r"[^\d-]", "", value)
    return int(digits) if digits.lstrip("-").isdigit() else None


@dataclass(frozen=True)
class ApiLimits:
    """The limit headers of one response (None where the vault did not send one)."""

    burst_limit: int | None = None
    burst_remaining: int | None = None
    daily_limit: int | None = None
    daily_remaining: int | None = None
    response_delay_ms: int | None = None  # set when Vault delayed the answer (burst limit passed)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> ApiLimits:
        return cls(_number(headers, "X-VaultAPI-BurstLimit"), _number(headers, "X-VaultAPI-BurstLimitRemaining"),
                   _number(headers, "X-VaultAPI-DailyLimit"), _number(headers, "X-VaultAPI-DailyLimitRemaining"),
                   _number(headers, "X-VaultAPI-ResponseDelay"))


@dataclass(frozen=True)
class VaultResponse:
    """A successful (or per-record) envelope: status, body, every warning, the limits."""

    status: str
    body: dict
    warnings: tuple[VaultWarning, ...] = ()
    limits: ApiLimits = field(default_factory=ApiLimits)

    @property
    def data(self) -> Any:
        return self.body.get("data")

    @property
    def total(self) -> int | None:
        """responseDetails.total: the records the query matches (None when not given)."""
        value = (self.body.get("responseDetails") or {}).get("total")
        try:
            return int(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    @property
    def next_page(self) -> str | None:
        return (self.body.get("responseDetails") or {}).get("next_page")


@dataclass(frozen=True)
class QueryPage:
    """One page of a query: records with picklist arrays flattened, and the columns asked for
    (an empty page still names them)."""

    records: list[dict]
    columns: list[str]
    warnings: tuple[VaultWarning, ...] = ()
    # the records the whole query (or deletions request) matches, as its responseDetails say
    # (None when they do not): what progress lines count against
    total: int | None = None

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True)
class RecordOutcome:
    """What happened to one input record of a write call (index = position in the input)."""

    index: int
    id: str | None
    outcome: str  # created | updated | unchanged | failed
    error_type: str | None = None
    message: str | None = None
    warnings: tuple[VaultWarning, ...] = ()
