"""VQL: literals and a query builder. `quote` is the only way data enters a statement.

A `Query` is built from a field list and rendered to text once; its columns are the field list
itself, so nothing ever parses a statement back. Every value is written as a single-quoted
literal with backslash and quote escaped, so a value can never end the literal and change the
query; datetimes are written in UTC the way Vault wants them.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime

from clinical_crm.vault.fields import VQL_MAX_CHARS, vault_datetime


def quote(value: object) -> str:
    """One VQL literal: 'text' with \\ and ' escaped; true/false/null; quoted dates/datetimes."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):  # before date: a datetime is a date too
        return f"'{vault_datetime(value)}'"
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
    """Split values into lists whose in_list() text fits in `room` characters (what the rest of
    the statement leaves free)."""
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


def page_aligned_chunks(values: list[str], room: int, page_size: int) -> Iterator[list[str]]:
    """Chunks as large as `room` allows, cut to a multiple of `page_size` when a chunk holds more
    than a page: a lookup that matches one record per value then needs ceil(values / page)
    pages in all (5,000 identifiers: 5 pages, not 4 + 2)."""
    i = 0
    while i < len(values):
        size, cost = 0, 2
        while i + size < len(values):
            step = len(quote(values[i + size])) + 1
            if cost + step > room:
                break
            cost += step
            size += 1
        if size == 0:
            raise ValueError(f"a single value does not fit in {room} characters of VQL")
        if i + size < len(values) and size > page_size:
            size -= size % page_size
        yield values[i:i + size]
        i += size


@dataclass(frozen=True)
class Query:
    """SELECT fields FROM object [WHERE c1 AND c2 ...] [ORDER BY f] [PAGESIZE n].

    Conditions are joined with AND as given: a condition holding OR brings its own parentheses."""

    object: str
    fields: tuple[str, ...]
    where: tuple[str, ...] = ()
    order_by: str | None = None
    page_size: int | None = None

    @classmethod
    def select(cls, object_name: str, fields: Iterable[str | None]) -> Query:
        """A query of these fields, without duplicates or blanks, in order."""
        return cls(object_name, tuple(dict.fromkeys(f for f in fields if f)))

    def filter(self, *conditions: str) -> Query:
        return replace(self, where=self.where + tuple(conditions))

    def ordered(self, field: str) -> Query:
        return replace(self, order_by=field)

    def paged(self, page_size: int | None) -> Query:
        return replace(self, page_size=page_size)

    @property
    def columns(self) -> list[str]:
        return list(self.fields)

    @property
    def statement(self) -> str:
        text = f"SELECT {', '.join(self.fields)} FROM {self.object}"
        if self.where:
            text += " WHERE " + " AND ".join(self.where)
        if self.order_by:
            text += f" ORDER BY {self.order_by}"
        if self.page_size:
            text += f" PAGESIZE {int(self.page_size)}"
        return text

    def __str__(self) -> str:
        return self.statement

    def contains(self, field: str, values: Iterable[str], page_aligned: bool = False) -> Iterator[Query]:
        """This query narrowed to `field CONTAINS (...)`, split so that every statement fits
        Vault's limit; with `page_aligned`, chunks are cut to whole pages (see page_aligned_chunks)."""
        values = sorted({v for v in values if v})
        head = len(replace(self, page_size=None).filter(f"{field} CONTAINS ").statement)
        room = VQL_MAX_CHARS - head - 100
        if page_aligned and self.page_size:
            chunks = page_aligned_chunks(values, room, self.page_size)
        else:
            chunks = chunk_values(values, room=room)
        for chunk in chunks:
            yield self.filter(f"{field} CONTAINS {in_list(chunk)}")
