"""`X-VaultAPI-ReferenceID`: the client-chosen id Vault keeps with each call in its API usage log
(v23.3+), so a vault admin can tell which DAG run, task and try made a call.

Vault's documentation names the header but, in what this project has read, gives no length or
character rules for its value [U]. The rules applied here are therefore conservative choices:

- characters: ASCII letters, digits and `_ . -` inside a part; `:` only between parts (every run
  of other characters in a part, `+` and `:` of Airflow run ids included, becomes one `-`), so a
  value is safe in an HTTP header, a CSV cell of the usage log and a URL;
- length: a run's prefix at most RUN_PREFIX_MAX (64) characters, a whole id at most MAX_LENGTH
  (100). A longer text keeps its start and ends in `~` and 8 hex digits of its SHA-256, so it
  stays unique and the readable start still matches.

A run's prefix is `{connection}:{dag id}:{run id}` (stored in the ledger, shown on the page);
each task's calls carry `{run prefix}:{task id}:{try number}`, so every call of a run starts
with the run's prefix.
"""
from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 100
RUN_PREFIX_MAX = 64
TASK_PART_MAX = 28  # prefix 64 + ":" + task 28 + ":" + try (up to 6 digits) stays within 100
SEPARATOR = ":"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_.:-]+")
_HASH_CHARS = 9  # "~" + 8 hex digits


def part(text: object) -> str:
    """One part of an id: unsafe characters (and the separator) as `-`."""
    return _UNSAFE.sub("-", str(text)).strip("-") or "-"


def shorten(text: str, max_length: int) -> str:
    """`text` if it fits, else its start plus `~` and a short hash of the whole."""
    if len(text) <= max_length:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_CHARS - 1]
    return f"{text[:max_length - _HASH_CHARS]}~{digest}"


def clean(reference_id: str | None) -> str | None:
    """Any reference id made safe to send (a library user may pass anything); None stays None."""
    if reference_id is None:
        return None
    cleaned = _UNSAFE_ID.sub("-", reference_id).strip("-")
    return shorten(cleaned, MAX_LENGTH) if cleaned else None


def run_prefix(connection: str, dag_id: str, run_id: str) -> str:
    """The reference prefix of one DAG run: what the ledger stores and the page shows."""
    return shorten(SEPARATOR.join(part(p) for p in (connection, dag_id, run_id)), RUN_PREFIX_MAX)


def task_reference(prefix: str, task_id: str, try_number: int | str) -> str:
    """The reference id every call of one task try carries: the run's prefix kept whole."""
    return shorten(SEPARATOR.join((prefix, shorten(part(task_id), TASK_PART_MAX), part(try_number))), MAX_LENGTH)
