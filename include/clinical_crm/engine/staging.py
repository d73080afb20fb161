"""Run-scoped parquet files on object storage, so any worker can read what another wrote.

Root: settings.staging_url(), <storage root>/staging (`file://<data>/staging` by default, any
fsspec URL such as `s3://bucket/prefix/staging` in production, on the storage connection).
Writers append page by page and readers iterate in chunks, so memory follows the page size, not
the number of records.

Every column is stored as nullable text: Vault pages differ in which columns are all empty,
and text keeps one schema for the whole file (booleans become "true"/"false"). The rules read
text (see clinical_crm.values). Vault query pages become frames here (`page_frame`): the Vault
client itself knows no pandas.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from clinical_crm.flows.base import frame_rows
from clinical_crm import settings
from clinical_crm.engine.context import StagedFile

CHUNK_ROWS = 20_000


def _path(url: str):
    from airflow.sdk import ObjectStoragePath  # light: the Task SDK only

    # the storage root's connection (settings.storage_conn_id(): e.g. an `aws` connection)
    return ObjectStoragePath(url, conn_id=settings.storage_conn_id())


def run_dir(connection: str, direction: str, run_key: str) -> str:
    """The folder of one run's files (a URL); run_key is made safe for paths."""
    return f"{settings.staging_url().rstrip('/')}/{connection}/{direction}/{settings.file_safe(run_key)}"


def remove_run(url: str) -> None:
    """Drop a finished run's files: the ledger keeps what happened, staging only carries data
    between the tasks of one run (a failed run keeps its files for inspection and retries)."""
    path = _path(url)
    if path.exists():
        path.rmdir(recursive=True)


def _as_text(value) -> str | None:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return _as_text(value[0]) if value else None
    return str(value)


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_null, pa.types.is_boolean)


def _text_array(values: pd.Series) -> pa.Array:
    """A column as an Arrow text array, the same values `_as_text` gives one by one.

    Fast path (C, no Python per value) for what Vault pages hold almost always: columns of text
    and missing values (None / NaN / NA) or of booleans ("true"/"false"); anything else (numbers,
    lists, mixed types) goes value by value through `_as_text`.
    """
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError):
        array = None
    if array is not None and any(is_type(array.type) for is_type in _TEXT_TYPES):
        return array.cast(pa.string())
    return pa.array([_as_text(v) for v in values], pa.string())


class FrameWriter:
    """Appends frames to one parquet file; columns are fixed by `columns` or the first frame.

    Frames are written in row groups of at least `ROW_GROUP_ROWS` rows (the last one may be
    smaller): a parquet writer keeps the metadata of every row group until it closes, and a
    row group per Vault page (1,000 rows) made that grow with N (1,000 row groups of 20
    columns at 1,000,000 activities: ~16 MiB while writing, ~18 MiB more to close)."""

    ROW_GROUP_ROWS = CHUNK_ROWS

    def __init__(self, url: str, columns: Iterable[str] | None = None):
        self.url = url
        self.columns = list(columns) if columns is not None else None
        self.rows = 0
        self._file: BinaryIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        if self.columns is None:
            self.columns = [str(c) for c in frame.columns]
        if frame.empty:
            return
        self._open()
        arrays = [_text_array(frame[c]) if c in frame.columns else pa.nulls(len(frame), pa.string())
                  for c in self.columns]
        self._pending.append(pa.Table.from_arrays(arrays, schema=self._schema()))
        self._pending_rows += len(frame)
        self.rows += len(frame)
        if self._pending_rows >= self.ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            table = self._pending[0] if len(self._pending) == 1 else pa.concat_tables(self._pending)
            self._pending, self._pending_rows = [], 0
            assert self._writer is not None  # opened by write()
            self._writer.write_table(table, row_group_size=max(table.num_rows, 1))

    def _schema(self) -> pa.Schema:
        return pa.schema([(c, pa.string()) for c in self.columns or []])

    def _open(self) -> None:
        if self._writer is None:
            path = _path(self.url)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("wb")
            self._writer = pq.ParquetWriter(self._file, self._schema())

    def close(self) -> StagedFile:
        """Finish the file (an empty one when nothing was written)."""
        self._open()
        self._flush()
        assert self._writer is not None and self._file is not None
        self._writer.close()
        self._file.close()
        return StagedFile(self.url, self.rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_frames(url: str, frames: Iterable[pd.DataFrame], columns: Iterable[str] | None = None) -> StagedFile:
    """Stream frames into one parquet file. A generator of frames is closed when this ends, even
    by an error here (so a query's reading thread stops then: see extract.prefetched)."""
    writer = FrameWriter(url, columns)
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        if hasattr(frames, "close"):
            frames.close()
    return writer.close()


def read_chunks(url: str | None, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Frames of at most chunk_rows rows; text columns with None for missing values."""
    if not url:
        return
    path = _path(url)
    if not path.exists():
        return
    with path.open("rb") as handle:
        # pre_buffer off: on, pyarrow (>= 13 its default) reads the column chunks of every row
        # group of the file ahead of the first batch and keeps them, so a reader held the whole
        # file (67 MB of parquet for 1,000,000 activities, and the heap that stayed after it)
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            # column by column in C (object arrays: text and None), not row dicts
            yield pd.DataFrame({name: pd.Series(batch.column(i).to_numpy(zero_copy_only=False), dtype=object)
                                for i, name in enumerate(batch.schema.names)})


def read_columns(url: str | None, columns: Iterable[str], chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Like read_chunks, reading only `columns` (those the file has): a pass over one or two
    columns of a large file (reconciliation's scope, its sort keys) without the others."""
    if not url or not _path(url).exists():
        return
    with _path(url).open("rb") as handle:
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        wanted = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
            yield pd.DataFrame({name: pd.Series(batch.column(i).to_numpy(zero_copy_only=False), dtype=object)
                                for i, name in enumerate(batch.schema.names)})


def read_frame(url: str | None) -> pd.DataFrame:
    """A whole staged file as one frame (for the small ones: accounts, persons, deleted ids)."""
    chunks = list(read_chunks(url))
    if not chunks:
        columns = []
        if url and _path(url).exists():
            with _path(url).open("rb") as handle:
                columns = pq.ParquetFile(handle).schema_arrow.names
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    return pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]


def page_frame(page) -> pd.DataFrame:
    """A Vault query page (clinical_crm.vault.QueryPage) as a frame of its columns, in order,
    plus any extra column its records carry; object dtype keeps None as None."""
    columns = list(dict.fromkeys([*page.columns, *(k for r in page.records[:1] for k in r)]))
    return pd.DataFrame({c: pd.Series([r.get(c) for r in page.records], dtype=object) for c in columns})


def records(frame: pd.DataFrame) -> list[dict]:
    """The rows as dicts (flows.base.frame_rows: the flows build their records the same way)."""
    return frame_rows(frame)


class IdSet:
    """Record ids seen across the chunks of one run, exact, in about 20 bytes an id (a Python set
    of 1,000,000 id strings takes ~100 MB and made memory grow with N).

    Ids are kept as sorted arrays of UTF-8 bytes; a lookup is a binary search in each array.
    New ids arrive as small arrays, merged into one now and then (`MAX_PARTS`) so lookups stay
    few; a merged array of `BLOCK` ids or more is sealed and never merged again. Merging
    everything into one array each time made a run's largest allocations grow with N (at
    1,000,000 ids three ~16 MB copies a merge), and the heap they left behind stayed with the
    process: +90 MiB peak RSS in the validate step at 1,000,000 rows."""

    MAX_PARTS = 8
    BLOCK = 1 << 18  # ids in a sealed array: 4 MiB of 16-byte Vault ids

    def __init__(self) -> None:
        self._sealed: list[np.ndarray] = []
        self._parts: list[np.ndarray] = []

    @staticmethod
    def _encode(ids: Iterable) -> np.ndarray:
        values = np.asarray(ids.to_numpy() if isinstance(ids, pd.Series) else list(ids), dtype=object)
        if not values.size:
            return np.array([], dtype="S1")
        try:
            return values.astype(str).astype("S")      # Vault ids are ASCII: the fast path
        except UnicodeEncodeError:
            return np.char.encode(values.astype(str), "utf-8")

    def isin(self, ids: Iterable) -> np.ndarray:
        """A boolean mask: which of `ids` were added before."""
        values = self._encode(ids)
        found = np.zeros(values.shape, dtype=bool)
        for part in (*self._sealed, *self._parts):
            at = np.minimum(np.searchsorted(part, values), part.size - 1)
            found |= part[at] == values
        return found

    @staticmethod
    def _unique(values: np.ndarray) -> np.ndarray:
        """Sorted and without repeats, like np.unique, which for byte strings (numpy 2) builds a
        hash table first: 14 MiB at its peak for 180,000 ids against 3 MiB sorting in place."""
        values.sort()
        if values.size > 1:
            keep = np.empty(values.size, dtype=bool)
            keep[0] = True
            np.not_equal(values[1:], values[:-1], out=keep[1:])
            if not keep.all():
                values = values[keep]
        return values

    def add(self, ids: Iterable) -> None:
        values = self._unique(self._encode(ids))
        if values.size:
            self._parts.append(values)
        if len(self._parts) > self.MAX_PARTS:
            merged = self._unique(np.concatenate(self._parts))
            if merged.size >= self.BLOCK:
                self._sealed.append(merged)
                self._parts = []
            else:
                self._parts = [merged]

    def missing(self, ids: Iterable) -> list[str]:
        """Those of `ids` never added."""
        ids = [str(i) for i in ids]
        return [i for i, seen in zip(ids, self.isin(ids)) if not seen]
