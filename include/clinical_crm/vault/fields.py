"""Names and formats every Vault shares: standard fields, relationship names, global ids,
datetimes, and the API's fixed limits. Not configuration: they are the same in every vault."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

# Standard fields of every object.
ID = "id"
GLOBAL_ID = "global_id__sys"
NAME = "name__v"
STATUS = "status__v"
MODIFIED_DATE = "modified_date__v"
OBJECT_TYPE_API_NAME = "object_type__vr.api_name__v"
CREATED_BY = "created_by__vr"

MAX_BATCH = 500          # records per write call
VQL_MAX_CHARS = 50_000   # characters per VQL statement
DELETIONS_KEPT_DAYS = 30  # the deletions API keeps deleted record ids this long
DELETIONS_LIMIT = 5_000   # deleted record ids per page: Vault's maximum (its default is 1,000)


def relationship(field: str) -> str:
    """The relationship name of a reference field: study__v -> study__vr, person__clin -> person__clinr."""
    return field + "r"


def global_id(vault_id: Any, record_id: Any) -> str:
    """A record's global id (`{vault_id}_{id}`): how deleted ids find their target records."""
    return f"{vault_id}_{record_id}"


def vault_datetime(value: datetime, millis: bool = True) -> str:
    """A datetime as Vault writes it, in UTC (naive means UTC): 2026-11-25T10:00:00.000Z;
    without `millis` as the deletions API takes it: 2026-11-25T10:00:00Z."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{value.microsecond // 1000:03d}Z" if millis else f"{text}Z"
