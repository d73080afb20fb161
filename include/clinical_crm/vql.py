"""VQL literals. `quote` is the only way data enters a VQL statement.

Every value is written as a single-quoted string literal with backslash and quote escaped, so a
value can never end the literal and change the query. Dates and datetimes are written the way
Vault wants them (datetimes in UTC, `YYYY-MM-DDTHH:MM:SS.SSSZ`).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date, datetime, timezone

VQL_MAX_CHARS = 50_000  # Vault rejects longer statements


def format_datetime(value: datetime) -> str:
    """A datetime as Vault writes it, in UTC; a naive datetime is taken to be UTC already."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def quote(value: object) -> str:
    """One VQL literal: 'text' with \\ and ' escaped; true/false/null; quoted dates/datetimes."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):  # before date: a datetime is a date too
        return f"'{format_datetime(value)}'"
    if isinstance(value, date):
        return f"'{value.isoformat()}'"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def in_list(values: Iterable[object]) -> str:
    """A parenthesised list for CONTAINS: ('a','b'). An empty list is refused (invalid VQL)."""
    literals = [quote(v) for v in values]
    if not literals:
        raise ValueError("in_list needs at least one value")
    return "(" + ",".join(literals) + ")"


def chunk_values(values: Iterable[object], room: int = VQL_MAX_CHARS - 2_000) -> Iterator[list]:
    """Split values into lists whose in_list() text fits in `room` characters.

    Pass as `room` what the rest of the statement leaves free, e.g.
    `VQL_MAX_CHARS - len(statement_without_list)`.
    """
    chunk: list = []
    size = 2  # the parentheses
    for value in values:
        cost = len(quote(value)) + 1  # the comma
        if chunk and size + cost > room:
            yield chunk
            chunk, size = [], 2
        if 2 + cost > room:
            raise ValueError(f"a single value does not fit in {room} characters of VQL")
        chunk.append(value)
        size += cost
    if chunk:
        yield chunk
