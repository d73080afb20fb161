"""The storage root: where everything the product writes besides the ledger lives.

    <root>/staging/<connection>/<flow>/<run>/...        run-scoped parquet (engine/staging.py)
    <root>/reports/<connection>/gx/                      the GX project and its Data Docs (engine/quality.py)
    <root>/reports/<connection>/gx_archive/              GX runs out of the live project (housekeeping)
    <root>/reports/<connection>/runs/<flow>/<run>.*      run files: summary, quarantine CSV/JSON
    <root>/reports/<connection>/alerts_sent.json         alert state (engine/alerts.py)

The root is `settings.storage_url()`: a local folder by default (`file://<data dir>`), or any
URL Airflow's `ObjectStoragePath` knows, e.g. `s3://bucket/prefix` (the Amazon provider's
filesystem), on the Airflow connection `settings.storage_conn_id()` when one is named.

A local root is handled with plain `pathlib` (what the project did before there was a root:
the same files in the same places, as fast); a remote one with `ObjectStoragePath` and, for
listings and bulk copies, its fsspec filesystem (the one `ObjectStoragePath` authenticates
with the connection). Nothing here decides what is written: the writers call `path()`.
"""
from __future__ import annotations

import io
import mimetypes
import posixpath
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clinical_crm import settings

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    StoragePath = Path | ObjectStoragePath
else:
    StoragePath = Any

LOCAL_SCHEMES = ("", "file", "local")


def is_local(url: str) -> bool:
    return urlsplit(url).scheme in LOCAL_SCHEMES


def local_folder(url: str) -> Path:
    """The local path of a file:// URL (or of a plain path)."""
    parts = urlsplit(url)
    return Path(parts.netloc + parts.path) if parts.scheme else Path(url)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts if p)])


def path(url: str) -> StoragePath:
    """A file or folder of the storage root by its URL: a `Path` when local, else an
    `ObjectStoragePath` on the storage connection."""
    if is_local(url):
        return local_folder(url)
    from airflow.sdk import ObjectStoragePath

    return ObjectStoragePath(url, conn_id=settings.storage_conn_id())


def reports(*parts: str) -> StoragePath:
    """<root>/reports/<parts...> (`settings.reports_url()`)."""
    return path(join(settings.reports_url(), *parts))


def name(p: StoragePath) -> str:
    """How a stored file is named in summaries, the ledger, alerts and logs: a local path as
    before, an object by its URL (without the connection id ObjectStoragePath's str shows)."""
    if isinstance(p, Path):
        return str(p)
    return f"{p.protocol}://{p.path}"


def open_text(p: StoragePath, **text: Any) -> IO[str]:
    """A file opened for writing text (`encoding`, `newline` ...), for writers of many small
    lines (the quarantine files): ObjectStoragePath's own `open` reports lineage on every
    `write` call, so on a remote root the filesystem's file is opened directly."""
    if isinstance(p, Path):
        return p.open("w", **text)
    return io.TextIOWrapper(p.fs.open(p.path, "wb"), **text)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, the path of `url` on it), listings cache emptied: other workers
    write the same store, and a long-lived process (the api-server) must see what they wrote."""
    if is_local(url):
        from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]

        return LocalFileSystem(), str(local_folder(url))
    from airflow.sdk import ObjectStoragePath

    target = ObjectStoragePath(url, conn_id=settings.storage_conn_id())
    fs = target.fs
    fs.invalidate_cache()
    return fs, target.path


def mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) of an fsspec `info`/`find(detail=True)` entry, of any
    filesystem (local `mtime`, S3 `LastModified`, GCS `updated` ...); None for an S3 folder."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is not None:
            if hasattr(value, "timestamp"):
                return value.timestamp()
            try:
                return float(value)
            except (TypeError, ValueError):
                from datetime import datetime

                return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    return None


class Tree:
    """A read-only view of one folder of the storage root (the page's reports folder): names
    relative to it, and nothing outside it (a name that leaves it, by `..`, an absolute path
    elsewhere or a link on a local disk, is refused)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.local = is_local(url)
        if self.local:
            self.base = local_folder(url).resolve()
        else:
            self.fs, self.key = filesystem(url)

    def inside(self, text: str) -> str | None:
        """`text` (relative to the tree, or an absolute path / URL in it) as a relative posix
        name inside the tree; None when it is not inside."""
        if self.local:
            target = Path(text)
            if not target.is_absolute():
                target = self.base / target
            target = target.resolve()
            return target.relative_to(self.base).as_posix() if target.is_relative_to(self.base) else None
        if "://" in text:
            if not text.startswith(self.url + "/"):
                return None
            text = text[len(self.url) + 1:]
        if text.startswith("/") or "\\" in text:
            return None
        rel = posixpath.normpath(text)
        return None if rel == ".." or rel.startswith("../") else ("" if rel == "." else rel)

    def _full(self, rel: str) -> str:
        return f"{self.key}/{rel}" if rel else self.key

    def is_dir(self, rel: str) -> bool:
        return (self.base / rel).is_dir() if self.local else self.fs.isdir(self._full(rel))

    def is_file(self, rel: str) -> bool:
        return (self.base / rel).is_file() if self.local else self.fs.isfile(self._full(rel))

    def read_bytes(self, rel: str) -> bytes:
        return (self.base / rel).read_bytes() if self.local else self.fs.cat_file(self._full(rel))

    def local_file(self, rel: str) -> Path | None:
        return self.base / rel if self.local else None

    def glob(self, pattern: str) -> list[str]:
        """Relative names matching a relative glob pattern, sorted."""
        if self.local:
            return sorted(p.relative_to(self.base).as_posix() for p in self.base.glob(pattern))
        prefix = self.key + "/"
        return sorted(p[len(prefix):] for p in self.fs.glob(prefix + pattern) if p.startswith(prefix))


def media_type(rel: str) -> str:
    return mimetypes.guess_type(rel)[0] or "application/octet-stream"
