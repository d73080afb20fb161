"""VaultClient: one client for every Vault the connection talks to (CTMS and Medical CRM).

Plain `requests`, no Airflow. What it takes care of:
- username/password auth, one session reused for every call, one transparent re-auth when Vault
  answers INVALID_SESSION_ID (idle timeout);
- Vault's envelope (HTTP 200 even for failures) turned into results or clinical_crm.errors;
- retries with exponential backoff and full jitter (tenacity) for transient faults only;
- a (connect, read) timeout on every request and the X-VaultAPI-ClientID header;
- pacing from the burst-limit headers;
- VQL paging into one pandas frame per page, deletions, and 500-record write batches with one
  RecordOutcome per input row.

Passwords and session ids never reach a log: logs name the user, the URL path and counts.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

import pandas as pd
import requests
import tenacity

from clinical_crm.errors import (
    VaultAuthenticationError,
    VaultError,
    VaultInvalidDataError,
    VaultQueryError,
    VaultRateLimitError,
    VaultTransientError,
    error_for,
)
from clinical_crm.vql import VQL_MAX_CHARS, format_datetime

log = logging.getLogger(__name__)

MAX_BATCH = 500  # Vault's limit of records per write call


@dataclass(frozen=True)
class RecordOutcome:
    """What happened to one input record of a write call (index = position in the input)."""

    index: int
    id: str | None
    outcome: str  # created | updated | unchanged | failed
    error_type: str | None = None
    message: str | None = None


class VaultClient:
    """A session with one Vault. See docs/contracts.md for the interface."""

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        api_version: str = "v25.2",
        client_id: str = "clinical-crm-connection",
        connect_timeout: float = 10,
        read_timeout: float = 120,
        burst_floor: int = 50,
        max_retries: int = 6,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        pace_max_seconds: float = 2.0,
        race_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if "://" not in base_url:
            base_url = "https://" + base_url
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.api_version = api_version if api_version.startswith("v") else f"v{api_version}"
        self.timeout = (float(connect_timeout), float(read_timeout))
        self.burst_floor = int(burst_floor)
        self.max_retries = int(max_retries)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.pace_max_seconds = pace_max_seconds
        self.race_retries = race_retries
        self._sleep = sleep
        self._http = requests.Session()
        self._http.headers.update({"Accept": "application/json", "X-VaultAPI-ClientID": client_id})
        self._session_id: str | None = None
        self._vault_id: str | None = None
        self.burst_remaining: int | None = None
        # Read by tests and benchmarks. Keys: "calls.<kind>" (HTTP requests by kind: auth, query,
        # query_page, deletions, write, get, metadata, permissions, picklist), "auth", "reauth",
        # "retry", "race_retry", "records_written", "paced", "pace_seconds",
        # "delayed_responses", "response_delay_ms".
        self.counters: Counter = Counter()

    def __repr__(self) -> str:
        return f"VaultClient({self.base_url!r}, user={self.username!r})"

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- session -------------------------------------------------------------------------------

    def authenticate(self) -> None:
        """Open a session now (otherwise the first call does it)."""
        self._retrying()(self._authenticate_once)

    @property
    def vault_id(self) -> str:
        if self._session_id is None:
            self.authenticate()
        return str(self._vault_id)

    def close(self) -> None:
        """End the Vault session (best effort) and the HTTP connection pool."""
        if self._session_id is not None:
            try:
                self._http.delete(
                    self._url("session"), headers={"Authorization": self._session_id}, timeout=self.timeout
                )
            except requests.RequestException:
                pass
            self._session_id = None
        self._http.close()

    def _authenticate_once(self) -> str:
        self.counters["auth"] += 1
        self.counters["calls.auth"] += 1
        body = self._send(
            "POST", "auth", session_id=None, data={"username": self.username, "password": self._password}
        )
        self._session_id = body["sessionId"]
        self._vault_id = str(body.get("vaultId", ""))
        log.info("Authenticated to %s as %s (vault %s)", self.base_url, self.username, self._vault_id)
        return self._session_id

    # -- one call: retries, re-auth, envelope ----------------------------------------------------

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(VaultTransientError),
            wait=tenacity.wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max),
            stop=tenacity.stop_after_attempt(self.max_retries + 1),
            sleep=self._sleep,
            before_sleep=self._count_retry,
            reraise=True,
        )

    def _count_retry(self, state: tenacity.RetryCallState) -> None:
        self.counters["retry"] += 1
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "Transient Vault fault (%s) on attempt %d; retrying in %.2fs",
            error, state.attempt_number, state.next_action.sleep if state.next_action else 0,
        )

    def _call(self, method: str, path: str, kind: str, **request_args) -> dict:
        """One API call with retries of transient faults and one re-auth on an expired session."""
        return self._retrying()(self._call_once, method, path, kind, request_args)

    def _call_once(self, method: str, path: str, kind: str, request_args: dict) -> dict:
        session_id = self._session_id or self._authenticate_once()
        self.counters[f"calls.{kind}"] += 1
        try:
            return self._send(method, path, session_id=session_id, **request_args)
        except VaultAuthenticationError as exc:
            if exc.error_type != "INVALID_SESSION_ID":
                raise
            self.counters["reauth"] += 1
            log.info("Vault session of %s expired; authenticating again", self.username)
            self._session_id = None
            session_id = self._authenticate_once()
            self.counters[f"calls.{kind}"] += 1
            try:
                return self._send(method, path, session_id=session_id, **request_args)
            except VaultAuthenticationError as again:
                if again.error_type != "INVALID_SESSION_ID":
                    raise
                # the brand-new session ended too (the login itself worked, so the credentials
                # are fine): a transient fault, retried with backoff, not a reason to fail fast
                self._session_id = None
                raise VaultTransientError("INVALID_SESSION_ID", "the session ended again right after "
                                          "re-authentication") from again

    def _url(self, path: str) -> str:
        if path.startswith("/api/"):  # next_page links are absolute paths
            return self.base_url + path
        return f"{self.base_url}/api/{self.api_version}/{path.lstrip('/')}"

    def _send(self, method: str, path: str, session_id: str | None, record_results: bool = False,
              **request_args) -> dict:
        """One HTTP request; returns the JSON body of a successful envelope or raises."""
        headers = {"Authorization": session_id} if session_id else {}
        try:
            response = self._http.request(
                method, self._url(path), headers=headers, timeout=self.timeout, **request_args
            )
        except requests.Timeout as exc:
            raise VaultTransientError("TIMEOUT", f"{method} {_path_only(path)}: {type(exc).__name__}") from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise VaultTransientError(
                "CONNECTION_ERROR", f"{method} {_path_only(path)}: {type(exc).__name__}"
            ) from exc
        self._observe_limits(response)
        if response.status_code >= 500:
            raise VaultTransientError(f"HTTP_{response.status_code}", f"{method} {_path_only(path)}")
        if response.status_code == 429:
            raise VaultRateLimitError("API_LIMIT_EXCEEDED", f"HTTP 429 on {method} {_path_only(path)}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise VaultError(f"HTTP_{response.status_code}", f"{method} {_path_only(path)} answered without a JSON envelope")
        status = body.get("responseStatus")
        if status in ("SUCCESS", "WARNING"):
            return body
        if record_results and isinstance(body.get("data"), list):
            return body  # per-record results; the caller reads each one
        errors = body.get("errors") or [{"type": status or f"HTTP_{response.status_code}", "message": ""}]
        first = errors[0]
        error_type, message = first.get("type") or "UNKNOWN", first.get("message") or ""
        if status == "EXCEPTION":  # a server-side fault, whatever type it names: worth a retry
            raise VaultTransientError(error_type, message)
        raise error_for(error_type, message)

    def _observe_limits(self, response: requests.Response) -> None:
        """Pace from the burst headers; a Vault response delay is not a fault, just counted."""
        delay = response.headers.get("X-VaultAPI-ResponseDelay")
        if delay:
            self.counters["delayed_responses"] += 1
            self.counters["response_delay_ms"] += int(re.sub(r"\D", "", delay) or 0)
        remaining = response.headers.get("X-VaultAPI-BurstLimitRemaining")
        if remaining is None or not remaining.lstrip("-").isdigit():
            return
        self.burst_remaining = int(remaining)
        pause = self.pace_seconds(self.burst_remaining)
        if pause > 0:
            self.counters["paced"] += 1
            self.counters["pace_seconds"] += pause
            log.info("Burst limit nearly used (%d calls left); pausing %.2fs", self.burst_remaining, pause)
            self._sleep(pause)

    def pace_seconds(self, remaining: int) -> float:
        """No pause while at least `burst_floor` calls remain; then longer the fewer remain."""
        if self.burst_floor <= 0 or remaining >= self.burst_floor:
            return 0.0
        return self.pace_max_seconds * (self.burst_floor - max(remaining, 0)) / self.burst_floor

    # -- reading ---------------------------------------------------------------------------------

    def query(self, vql: str) -> Iterator[pd.DataFrame]:
        """Run VQL and yield one DataFrame per page (constant memory: one page held at a time)."""
        if len(vql) > VQL_MAX_CHARS:
            raise VaultQueryError("QUERY_TOO_LONG", f"VQL of {len(vql)} characters (Vault allows {VQL_MAX_CHARS})")
        columns = selected_columns(vql)
        body = self._call("POST", "query", "query", data={"q": vql})
        yield from self._pages(body, columns, "POST", "query_page", what=_query_target(vql))

    def deletions(self, object_name: str, start: datetime, end: datetime) -> Iterator[pd.DataFrame]:
        """Yield frames of (id, date_deleted) for records of `object_name` deleted in [start, end]."""
        params = {"start_date": _deletion_date(start), "end_date": _deletion_date(end)}
        body = self._call("GET", f"objects/deletions/vobjects/{object_name}", "deletions", params=params)
        yield from self._pages(body, ["id", "date_deleted"], "GET", "deletions", what=f"deletions of {object_name}")

    def _pages(self, body: dict, columns: list[str], method: str, kind: str, what: str) -> Iterator[pd.DataFrame]:
        started, pages, rows = time.monotonic(), 0, 0
        while True:
            data = body.get("data") or []
            pages += 1
            rows += len(data)
            frame = records_frame(data, columns)
            next_page = (body.get("responseDetails") or {}).get("next_page")
            del body, data  # hold one page only
            if pages % 10 == 0 or not next_page:
                elapsed = max(time.monotonic() - started, 1e-9)
                log.info("%s: %d pages, %d rows read (%.0f rows/s)", what, pages, rows, rows / elapsed)
            yield frame
            if not next_page:
                return
            body = self._call(method, next_page, kind)

    def get_record(self, object_name: str, record_id: str) -> dict:
        return self._call("GET", f"vobjects/{object_name}/{record_id}", "get")["data"]

    def object_metadata(self, object_name: str) -> dict:
        """The object's metadata (name, fields with type/unique/required/picklist, ...)."""
        body = self._call("GET", f"metadata/vobjects/{object_name}", "metadata")
        return body.get("object", body)

    def picklist_values(self, picklist_name: str) -> list[str]:
        body = self._call("GET", f"objects/picklists/{picklist_name}", "picklist")
        return [value["name"] for value in body.get("picklistValues", [])]

    def my_permissions(self, object_name: str) -> dict:
        """The integration user's object actions on `object_name`, e.g. {"read": True, ...}.

        Object-type level permissions, when Vault reports them, come under "object_types":
        {"clinical_activity__v": {"read": True, "create": True, ...}}.
        """
        body = self._call(
            "GET", "objects/users/me/permissions", "permissions",
            params={"filter": f"name__v::object.{object_name}.object_actions"},
        )
        return _permissions_of(object_name, body.get("data") or [])

    # -- writing ---------------------------------------------------------------------------------

    def upsert(self, object_name: str, records: list[dict], id_param: str, batch_size: int = MAX_BATCH) -> list[RecordOutcome]:
        """Create or update by the unique field `id_param`; one outcome per record, input order."""
        return self._write("POST", object_name, records, batch_size, "upsert", {"idParam": id_param})

    def create(self, object_name: str, records: list[dict], batch_size: int = MAX_BATCH) -> list[RecordOutcome]:
        return self._write("POST", object_name, records, batch_size, "create")

    def update(self, object_name: str, records: list[dict], batch_size: int = MAX_BATCH) -> list[RecordOutcome]:
        """Update records by their "id"; one outcome per record, input order."""
        return self._write("PUT", object_name, records, batch_size, "update")

    def _write(self, method: str, object_name: str, records: Iterable[dict], batch_size: int,
               operation: str, params: dict | None = None) -> list[RecordOutcome]:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, not {batch_size}")
        records = [_json_ready(record) for record in records]
        outcomes: list[RecordOutcome | None] = [None] * len(records)
        started = time.monotonic()
        for start in range(0, len(records), batch_size):
            batch = list(range(start, min(start + batch_size, len(records))))
            self._write_batch(method, object_name, records, batch, operation, params, outcomes)
            done = batch[-1] + 1
            self.counters["records_written"] += len(batch)
            elapsed = max(time.monotonic() - started, 1e-9)
            log.info("%s %s: %d/%d records (%.0f records/s)", operation, object_name, done, len(records), done / elapsed)
        return outcomes  # type: ignore[return-value]  (every slot is filled)

    def _write_batch(self, method, object_name, records, batch, operation, params, outcomes) -> None:
        """One write call for `batch` (indices into records); records that hit RACE_CONDITION are
        sent again on their own a few times before they are reported failed."""
        pending = batch
        for round_number in range(self.race_retries + 1):
            try:
                body = self._call(
                    method, f"vobjects/{object_name}", "write",
                    json=[records[i] for i in pending], params=params, record_results=True,
                )
            except VaultInvalidDataError as exc:  # the whole batch refused, e.g. duplicate idParam
                for i in pending:
                    outcomes[i] = RecordOutcome(i, records[i].get("id"), "failed", exc.error_type, exc.message)
                return
            results = body.get("data") or []
            if len(results) != len(pending):
                raise VaultError("UNEXPECTED_RESPONSE", f"{len(results)} results for {len(pending)} records")
            raced = []
            for i, result in zip(pending, results):
                outcome = _outcome(i, result, operation, records[i])
                if outcome.error_type == "RACE_CONDITION" and round_number < self.race_retries:
                    raced.append(i)
                else:
                    outcomes[i] = outcome
            if not raced:
                return
            self.counters["race_retry"] += len(raced)
            log.info("%d records of %s hit RACE_CONDITION; sending them again", len(raced), object_name)
            self._sleep(min(self.backoff_max, self.backoff_initial * 2**round_number))
            pending = raced


# -- helpers ---------------------------------------------------------------------------------------

def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _query_target(vql: str) -> str:
    match = re.search(r"\bfrom\s+([a-z0-9_]+)", vql, re.IGNORECASE)
    return f"query of {match.group(1)}" if match else "query"


_SELECT_TOKENS = re.compile(r"'(?:\\.|[^'\\])*'|[(),]|\bfrom\b", re.IGNORECASE)


def selected_columns(vql: str) -> list[str]:
    """The column names a VQL SELECT asks for, so an empty page still has them."""
    text = vql.strip()
    if text[:6].lower() != "select":
        return []
    body = text[6:]
    columns, depth, start = [], 0, 0
    for token in _SELECT_TOKENS.finditer(body):
        value = token.group(0).lower()
        if value == "(":
            depth += 1
        elif value == ")":
            depth -= 1
        elif depth == 0 and value in (",", "from"):
            columns.append(body[start:token.start()].strip())
            start = token.end()
            if value == "from":
                break
    # a wrapped field such as LONGTEXT(description__v) comes back under the field's name
    return [re.sub(r"^[a-z_]+\(\s*([^()]+?)\s*\)$", r"\1", c, flags=re.IGNORECASE) for c in columns if c]


def _flatten(value: Any) -> Any:
    """Vault returns picklist values as arrays: ["phone__v"] -> "phone__v", [] -> None."""
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        if not value:
            return None
    return value


def records_frame(data: list[dict], columns: list[str]) -> pd.DataFrame:
    """One page of records as a frame with the selected columns (plus any extra the page has)."""
    frame = pd.DataFrame.from_records(data) if data else pd.DataFrame(index=pd.RangeIndex(0))
    for name in columns:
        if name not in frame.columns:  # selected but absent from this page: keep it, empty
            frame[name] = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    frame = frame[list(columns) + [c for c in frame.columns if c not in columns]]
    for name in frame.columns:
        column = frame[name]
        if column.dtype == object and column.map(lambda v: isinstance(v, list)).any():
            frame[name] = column.map(_flatten)
    return frame


def _deletion_date(value: datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_ready(record: dict) -> dict:
    """A record as JSON Vault accepts: dates as text, NaN/NaT as null, numpy scalars as Python."""
    return {key: _json_value(value) for key, value in record.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or (not isinstance(value, (str, bool)) and pd.isna(value)):
        return None
    if isinstance(value, (pd.Timestamp, datetime)):
        return format_datetime(value.to_pydatetime() if isinstance(value, pd.Timestamp) else value)
    if isinstance(value, date):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalar
        return value.item()
    if isinstance(value, float) and math.isinf(value):
        return None
    return value


def _outcome(index: int, result: dict, operation: str, record: dict) -> RecordOutcome:
    """One per-record result of a write call as a RecordOutcome.

    created vs updated: the result's own signal when it has one ("operation" or "created"),
    otherwise create -> created, update -> updated, and an upsert success -> updated (Vault does
    not always say whether an upsert created the record).
    """
    status = result.get("responseStatus")
    data = result.get("data") or {}
    record_id = data.get("id") or record.get("id")
    if status in ("SUCCESS", "WARNING"):
        warnings = result.get("warnings") or []
        if any(w.get("warning_type", w.get("type")) == "NO_DATA_CHANGES" for w in warnings):
            return RecordOutcome(index, record_id, "unchanged")
        return RecordOutcome(index, record_id, _success_kind(result, data, operation))
    errors = result.get("errors") or [{"type": "UNKNOWN", "message": "no error given"}]
    message = "; ".join(e.get("message", "") for e in errors if e.get("message"))
    return RecordOutcome(index, record_id, "failed", errors[0].get("type", "UNKNOWN"), message or None)


def _success_kind(result: dict, data: dict, operation: str) -> str:
    signal = result.get("operation") or data.get("operation")
    if isinstance(signal, str):
        signal = signal.lower()
        if signal.startswith("creat") or signal == "insert":
            return "created"
        if signal.startswith("updat"):
            return "updated"
    created = data.get("created", result.get("created"))
    if isinstance(created, bool):
        return "created" if created else "updated"
    return "created" if operation == "create" else "updated"


def _permissions_of(object_name: str, entries: list[dict]) -> dict:
    """Vault's permission entries ("object.X.object_actions", and object-type ones) as a dict."""
    permissions: dict[str, Any] = {"read": False, "create": False, "edit": False, "delete": False, "object_types": {}}
    for entry in entries:
        name = entry.get("name__v") or entry.get("name") or ""
        actions = {k: bool(v) for k, v in (entry.get("permissions") or {}).items()}
        parts = name.split(".")
        if name == f"object.{object_name}.object_actions":
            permissions.update(actions)
        elif len(parts) >= 4 and parts[0] == "object" and parts[1] == object_name and parts[2] in ("object_type", "objecttype"):
            permissions["object_types"][parts[3]] = actions
    return permissions
