"""VaultClient: one client for every Vault the connection talks to (CTMS and Medical CRM).

Plain `requests`, no Airflow. What it takes care of:
- username/password auth, one session per vault and user shared by every client of the process
  (vault.session: Vault's per-user login limit), kept alive while idle (`POST keep-alive` before
  the vault's idle timeout), renewed before Vault's 48-hour cap, one transparent re-auth when
  Vault answers INVALID_SESSION_ID; logins are spaced and wait for the next minute when Vault
  refuses one past its login limit;
- `X-VaultAPI-ReferenceID` on every call (vault.reference), so Vault's API usage log names the
  run, task and try;
- a maintenance window (`X-VaultAPI-DowntimeExpectedDurationMinutes` on an error answer) waited
  out once per call, up to `maintenance_max_wait`, instead of spending the retries;
- Vault's envelope (HTTP 200 even for failures) turned into results or clinical_crm.errors;
- retries with exponential backoff and full jitter (tenacity) for transient faults only;
- a (connect, read) timeout on every request and the X-VaultAPI-ClientID header;
- safe to share between threads (one session, one login at a time, counters under a lock), so a
  load keeps several write calls in flight over one connection pool;
- pacing from the burst-limit headers (vault.pacing): no call past the limit, whatever the
  threads; a daily-limit header is read and watched only if a vault sends one (none has since
  v21.1: it is never required);
- VQL paging into one QueryPage per page (records, no pandas), deletions, and 500-record write
  batches with one RecordOutcome per input row; every warning is kept and logged.

Passwords and session ids never reach a log: logs name the user, the URL path and counts.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import date, datetime
from typing import Any, cast

import requests
import tenacity

from clinical_crm.vault import reference, session
from clinical_crm.vault.errors import (
    VaultAuthenticationError,
    VaultError,
    VaultInvalidDataError,
    VaultMaintenanceError,
    VaultPartialWrite,
    VaultQueryError,
    VaultRateLimitError,
    VaultTransientError,
    error_for,
)
from clinical_crm.vault.fields import (
    DELETIONS_LIMIT,
    MAX_BATCH,
    VQL_MAX_CHARS,
    vault_datetime,
)
from clinical_crm.vault.pacing import BurstGate
from clinical_crm.vault.responses import (
    NO_DATA_CHANGES,
    ApiLimits,
    QueryPage,
    RecordOutcome,
    VaultResponse,
    VaultWarning,
)
from clinical_crm.vault.vql import Query

log = logging.getLogger(__name__)

DAILY_LIMIT_WARNING_SHARE = 0.1  # warn once when less than this share of the daily limit is left
# HTTP connections kept per vault: at least the calls a run keeps in flight (config MAX_CONCURRENCY)
HTTP_POOL_SIZE = 16
SESSION_MAX_SECONDS = 48 * 3600  # Vault ends every session after 48 hours, whatever the activity
DOWNTIME_HEADER = "X-VaultAPI-DowntimeExpectedDurationMinutes"
REFERENCE_HEADER = "X-VaultAPI-ReferenceID"


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
        burst_window_seconds: float = 300.0,
        max_retries: int = 6,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        race_retries: int = 5,
        call_deadline: float = 600.0,
        reference_id: str | None = None,
        keep_alive_seconds: float = 600.0,
        session_max_seconds: float = SESSION_MAX_SECONDS,
        login_spacing_seconds: float = 1.0,
        login_window_seconds: float = 60.0,
        maintenance_max_wait: float = 1800.0,
        share_session: bool = True,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if "://" not in base_url:
            base_url = "https://" + base_url
        self.base_url = base_url.rstrip("/")
        self.username = username
        self._password = password
        self.api_version = api_version if api_version.startswith("v") else f"v{api_version}"
        self.timeout = (float(connect_timeout), float(read_timeout))
        self.burst_floor = int(burst_floor)  # calls kept in reserve in each burst window (0: no pacing)
        self.max_retries = int(max_retries)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.race_retries = race_retries
        self.call_deadline = float(call_deadline)  # one call and its retries end by then
        self.reference_id = reference_id
        # a keep-alive goes out once the session has been idle this long (0: never); below the
        # vault's idle timeout (an admin setting), so a long gap between calls never ends it
        self.keep_alive_seconds = float(keep_alive_seconds)
        # renewed this long before Vault's cap: a tenth of it, at most 10 minutes
        self.session_renew_after = float(session_max_seconds) - min(600.0, 0.1 * float(session_max_seconds))
        self.login_spacing_seconds = float(login_spacing_seconds)
        self.login_window_seconds = float(login_window_seconds)  # Vault's login limit window
        self.maintenance_max_wait = float(maintenance_max_wait)
        self._sleep = sleep
        self._http = requests.Session()
        pool = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=HTTP_POOL_SIZE)
        self._http.mount("https://", pool)
        self._http.mount("http://", pool)
        # one session per vault and user in this process (or this client's own)
        self._shared = (session.acquire(self.base_url, username, password) if share_session
                        else session.SharedSession(session.key_of(self.base_url, username, password)))
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None
        self._counting = threading.Lock()
        self.burst = BurstGate(self.burst_floor, burst_window_seconds)
        self._http.headers.update({"Accept": "application/json", "X-VaultAPI-ClientID": client_id})
        self.burst_remaining: int | None = None
        self.limits = ApiLimits()  # of the latest response
        self._daily_warned = False
        # Read by tests and benchmarks. Keys: "calls.<kind>" (HTTP requests by kind: auth, query,
        # query_page, deletions, write, get, metadata, permissions, picklist, keep_alive), "auth", "reauth",
        # "retry", "race_retry", "records_written", "paced", "pace_seconds",
        # "delayed_responses", "response_delay_ms", "warnings.<type>", "wait_seconds" (time in HTTP
        # requests), "sleep_seconds" (backoff and pacing), "session_renewed" (before the 48-hour
        # cap), "login_spaced", "login_limited", "maintenance_waits", "maintenance_seconds".
        self.counters: Counter[str] = Counter()  # counts, and seconds (floats)

    def _count(self, key: str, amount: float = 1) -> None:
        with self._counting:
            self.counters[key] += amount  # type: ignore[assignment]  # Counter is typed int; seconds are floats

    def __repr__(self) -> str:
        return f"VaultClient({self.base_url!r}, user={self.username!r})"

    def __enter__(self) -> VaultClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- session -------------------------------------------------------------------------------

    @property
    def reference_id(self) -> str | None:
        """Sent as X-VaultAPI-ReferenceID on every call (None: not sent)."""
        return self._reference_id

    @reference_id.setter
    def reference_id(self, value: str | None) -> None:
        self._reference_id = reference.clean(value)

    def authenticate(self) -> None:
        """Open a session now (otherwise the first call does it)."""
        self.retrying()(self._session, None)

    @property
    def _session_id(self) -> str | None:
        return self._shared.session_id

    @property
    def vault_id(self) -> str:
        if self._shared.session_id is None:
            self.authenticate()
        return str(self._shared.vault_id)

    def _current_session(self) -> str:
        """The session to call with; a new one when there is none or it nears Vault's 48-hour cap."""
        shared = self._shared
        if self._keeper is None and self.keep_alive_seconds > 0 and not self._closed.is_set():
            self._start_keep_alive()
        session_id = shared.session_id
        if session_id is None or time.monotonic() - shared.created >= self.session_renew_after:
            session_id = self._session(None)
        return session_id

    def _session(self, expired: str | None) -> str:
        """The session id to call with: a new login when there is none yet, when `expired` (the
        id a call was refused with) is still the current one, or when the current one is about
        to reach Vault's cap. Threads (and clients) that find the same expired session wait for
        one login instead of each making their own."""
        shared = self._shared
        with shared.lock:
            if shared.session_id is not None and shared.session_id == expired:
                self._count("reauth", 1)
                log.info("Vault session of %s expired; authenticating again", self.username)
                shared.session_id = None
            if shared.session_id is not None and time.monotonic() - shared.created >= self.session_renew_after:
                # the old session is not ended: calls still in flight with it finish normally
                self._count("session_renewed", 1)
                log.info("Vault session of %s is %.0f s old, near Vault's 48-hour cap: authenticating again",
                         self.username, time.monotonic() - shared.created)
                shared.session_id = None
            if shared.session_id is None:
                self._authenticate_once()
            if shared.session_id is None:  # _authenticate_once raises when Vault gives no session
                raise VaultAuthenticationError("NO_SESSION", "Vault answered the login without a session id")
            return shared.session_id

    def close(self) -> None:
        """Stop the keep-alive, end the Vault session (best effort) when no other client of this
        process shares it, and close the HTTP connection pool."""
        self._closed.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(timeout=self.timeout[0])
        shared, self._shared = self._shared, session.SharedSession(self._shared.key)
        if session.release(shared) and shared.session_id is not None:
            try:
                self._http.delete(self._url("session"), headers=self._headers(shared.session_id),
                                  timeout=self.timeout)
            except requests.RequestException:
                pass
            shared.session_id = None
        self._http.close()

    def _authenticate_once(self) -> str:
        """One login (under the shared session's lock), spaced from the last login of this vault
        and user; past Vault's login limit it waits for the next minute (twice at most)."""
        shared = self._shared
        if shared.last_login is not None:
            gap = time.monotonic() - shared.last_login
            if gap < self.login_spacing_seconds:
                self._count("login_spaced", 1)
                self.pause(self.login_spacing_seconds - gap)
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(VaultRateLimitError),
            wait=lambda _state: self._to_next_login_window(),
            stop=tenacity.stop_after_attempt(3), sleep=self.pause, reraise=True,
            before_sleep=lambda state: log.warning(
                "Vault login limit of %s reached for %s; waiting %.1fs for the next minute", self.base_url,
                self.username, state.next_action.sleep if state.next_action else 0),
        ):
            with attempt:
                shared.last_login = time.monotonic()
                self._count("auth", 1)
                self._count("calls.auth", 1)
                body = self._send(
                    "POST", "auth", session_id=None, data={"username": self.username, "password": self._password}
                ).body
        shared.session_id = body["sessionId"]
        shared.vault_id = str(body.get("vaultId", ""))
        shared.created = shared.last_used = time.monotonic()
        log.info("Authenticated to %s as %s (vault %s)", self.base_url, self.username, shared.vault_id)
        return shared.session_id

    def _to_next_login_window(self) -> float:
        """Seconds to the start of the next login window (windows taken as aligned to the clock)."""
        self._count("login_limited", 1)
        window = self.login_window_seconds
        return window - time.time() % window + min(1.0, 0.02 * window)

    def keep_alive(self) -> None:
        """`POST /api/{version}/keep-alive` with the current session: restarts its idle clock. It
        never logs in (a client left open must not hold sessions forever): a session found gone
        is dropped, and the next call logs in again."""
        shared = self._shared
        session_id = shared.session_id
        if session_id is None:
            return
        self._count("calls.keep_alive", 1)
        try:
            self._send("POST", "keep-alive", session_id=session_id)
        except VaultAuthenticationError:
            with shared.lock:
                if shared.session_id == session_id:
                    shared.session_id = None
            raise

    def _start_keep_alive(self) -> None:
        with self._counting:
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_alive_loop, daemon=True,
                                                name=f"vault-keep-alive-{self.username}")
                self._keeper.start()

    def _keep_alive_loop(self) -> None:
        """A timer, not a check before each call: a call would itself restart Vault's idle clock,
        so only a gap between calls (a long transform or validation) lets the session expire."""
        while True:
            shared = self._shared
            due = (shared.last_used + self.keep_alive_seconds - time.monotonic() if self._may_keep_alive(shared)
                   else self.keep_alive_seconds)
            if self._closed.wait(max(0.05, due)):
                return
            if not self._may_keep_alive(shared) or time.monotonic() - shared.last_used < self.keep_alive_seconds:
                continue  # used meanwhile (by any client sharing it)
            try:
                self.keep_alive()
            except (VaultError, requests.RequestException) as exc:  # the next call logs in again
                log.info("Keep-alive of the Vault session of %s failed: %s", self.username, exc)

    def _may_keep_alive(self, shared: session.SharedSession) -> bool:
        """A session to keep: there is one and it is not due for renewal (the next call renews it)."""
        return shared.session_id is not None and time.monotonic() - shared.created < self.session_renew_after

    def _headers(self, session_id: str | None) -> dict[str, str]:
        headers = {"Authorization": session_id} if session_id else {}
        if self._reference_id:
            headers[REFERENCE_HEADER] = self._reference_id
        return headers

    # -- one call: retries, re-auth, envelope ----------------------------------------------------

    def retrying(self) -> tenacity.Retrying:
        """The client's retry policy for transient faults: exponential backoff with full jitter,
        at most `max_retries` re-sends and `call_deadline` seconds in all (so client retries and
        Airflow's task retries never stack into hours). Callers that must re-check something
        before a re-send (the load's version guard) iterate it around `retry=False` calls."""
        backoff = tenacity.wait_random_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        waited: list[float] = []  # the maintenance wait of this call (once), added to its deadline

        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, VaultMaintenanceError) and not waited:
                waited.append(min(error.seconds, self.maintenance_max_wait))
                self._count("maintenance_waits", 1)
                self._count("maintenance_seconds", waited[0])
                log.warning("Vault %s is down for maintenance (expected %.1f min): waiting %.0f s for it, "
                            "once, instead of spending the retries", self.base_url, error.seconds / 60, waited[0])
                return waited[0]
            return backoff(state)

        def stop(state: tenacity.RetryCallState) -> bool:
            return (state.attempt_number >= self.max_retries + 1
                    or (state.seconds_since_start or 0) >= self.call_deadline + sum(waited))

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(VaultTransientError),
            wait=wait, stop=stop, sleep=self.pause, before_sleep=self._count_retry, reraise=True,
        )

    def pause(self, seconds: float) -> None:
        """Sleep (backoff, pacing), counted in `sleep_seconds`."""
        self._count("sleep_seconds", seconds)
        self._sleep(seconds)

    def _count_retry(self, state: tenacity.RetryCallState) -> None:
        self._count("retry", 1)
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "Transient Vault fault (%s) on attempt %d; retrying in %.2fs",
            error, state.attempt_number, state.next_action.sleep if state.next_action else 0,
        )

    def _call(self, method: str, path: str, kind: str, retry: bool = True, **request_args) -> VaultResponse:
        """One API call with retries of transient faults (unless `retry` is false) and one re-auth
        on an expired session."""
        if not retry:
            return self._call_once(method, path, kind, request_args)
        return self.retrying()(self._call_once, method, path, kind, request_args)

    def _call_once(self, method: str, path: str, kind: str, request_args: dict) -> VaultResponse:
        session_id = self._current_session()
        for attempt in (1, 2):
            self._count(f"calls.{kind}", 1)
            try:
                return self._send(method, path, session_id=session_id, **request_args)
            except VaultAuthenticationError as exc:
                if exc.error_type != "INVALID_SESSION_ID":
                    raise
                if attempt == 2:
                    with self._shared.lock:  # the next call logs in again
                        if self._shared.session_id == session_id:
                            self._shared.session_id = None
                    # the brand-new session ended too (the login itself worked, so the credentials
                    # are fine): a transient fault, retried with backoff, not a reason to fail fast
                    raise VaultTransientError("INVALID_SESSION_ID", "the session ended again right after "
                                              "re-authentication") from exc
                session_id = self._session(session_id)
        raise AssertionError("unreachable")

    def _url(self, path: str) -> str:
        if path.startswith("/api/"):  # next_page links are absolute paths
            return self.base_url + path
        return f"{self.base_url}/api/{self.api_version}/{path.lstrip('/')}"

    def _send(self, method: str, path: str, session_id: str | None, record_results: bool = False,
              **request_args) -> VaultResponse:
        """One HTTP request; returns a successful envelope (or per-record results) or raises."""
        headers = self._headers(session_id)
        # every call but the login counts against the burst limit (the login has its own)
        window = self.burst.enter(self._pace) if session_id else None
        started = time.monotonic()
        if session_id:
            self._shared.last_used = started
        response = None
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
        finally:
            self._count("wait_seconds", time.monotonic() - started)
            limits = self._observe_limits(response) if response is not None else ApiLimits()
            if window is not None:
                self.burst.leave(window, limits.burst_remaining)
        downtime = _minutes(response.headers.get(DOWNTIME_HEADER))
        if downtime is not None and response.status_code >= 400:
            raise VaultMaintenanceError(downtime, f"HTTP {response.status_code} on {method} {_path_only(path)}")
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
        if status in ("SUCCESS", "WARNING") or (record_results and isinstance(body.get("data"), list)):
            # a write's failures are per record; the caller reads each one
            warnings = VaultWarning.all_of(body)
            self._report_warnings(warnings, f"{method} {_path_only(path)}")
            return VaultResponse(str(status), body, warnings, self.limits)
        errors = body.get("errors") or [{"type": status or f"HTTP_{response.status_code}", "message": ""}]
        first = errors[0]
        error_type, message = first.get("type") or "UNKNOWN", first.get("message") or ""
        if downtime is not None:  # an error answer announcing downtime: wait for it, not retries
            raise VaultMaintenanceError(downtime, f"{error_type}: {message}")
        if status == "EXCEPTION":  # a server-side fault, whatever type it names: worth a retry
            raise VaultTransientError(error_type, message)
        raise error_for(error_type, message)

    def _observe_limits(self, response: requests.Response) -> ApiLimits:
        """Read the limit headers: a Vault response delay (the burst limit passed) is not a fault,
        just counted; a daily limit (gone from Vault since v21.1) is watched only if still sent."""
        self.limits = limits = ApiLimits.from_headers(response.headers)
        if limits.response_delay_ms is not None:
            self._count("delayed_responses", 1)
            self._count("response_delay_ms", limits.response_delay_ms)
        if (limits.daily_limit and limits.daily_remaining is not None and not self._daily_warned
                and limits.daily_remaining < limits.daily_limit * DAILY_LIMIT_WARNING_SHARE):
            self._daily_warned = True
            log.warning("Daily API limit of %s nearly used: %d of %d calls left", self.base_url,
                        limits.daily_remaining, limits.daily_limit)
        if limits.burst_remaining is not None:
            self.burst_remaining = limits.burst_remaining
        return limits

    def _pace(self, seconds: float) -> None:
        """A wait of the burst gate: the calls left in this window are the reserve."""
        self._count("paced", 1)
        self._count("pace_seconds", seconds)
        log.info("Burst limit of %s: %d calls left, the reserve (%d); waiting %.1fs for the next window",
                 self.base_url, self.burst_remaining or 0, self.burst_floor, seconds)
        self.pause(seconds)

    def _report_warnings(self, warnings: Iterable[VaultWarning], what: str) -> None:
        """Every warning but NO_DATA_CHANGES (an expected outcome) is logged and counted."""
        for warning in warnings:
            if warning.type != NO_DATA_CHANGES:
                self._count(f"warnings.{warning.type}", 1)
                log.warning("Vault warning on %s: %s %s", what, warning.type, warning.message)

    # -- reading ---------------------------------------------------------------------------------

    def query(self, query: Query | str) -> Iterator[QueryPage]:
        """Run VQL and yield one QueryPage per page (constant memory: one page held at a time).
        A `Query` names its columns; a plain statement's columns are those its records carry."""
        statement = query.statement if isinstance(query, Query) else query
        if len(statement) > VQL_MAX_CHARS:
            raise VaultQueryError("QUERY_TOO_LONG", f"VQL of {len(statement)} characters (Vault allows {VQL_MAX_CHARS})")
        columns = query.columns if isinstance(query, Query) else None
        what = f"query of {query.object}" if isinstance(query, Query) else "query"
        response = self._call("POST", "query", "query", data={"q": statement})
        yield from self._pages(response, columns, "POST", "query_page", what=what)

    def deletions(self, object_name: str, start: datetime, end: datetime) -> Iterator[QueryPage]:
        """Pages of (id, date_deleted) for records of `object_name` deleted in [start, end]."""
        params = {"start_date": vault_datetime(start, millis=False), "end_date": vault_datetime(end, millis=False),
                  "limit": DELETIONS_LIMIT}  # Vault's maximum: a fifth of the calls of its default
        response = self._call("GET", f"objects/deletions/vobjects/{object_name}", "deletions", params=params)
        yield from self._pages(response, ["id", "date_deleted"], "GET", "deletions", what=f"deletions of {object_name}")

    def _pages(self, response: VaultResponse, columns: list[str] | None, method: str, kind: str,
               what: str) -> Iterator[QueryPage]:
        started, pages, rows = time.monotonic(), 0, 0
        while True:
            records = [{k: _flatten(v) for k, v in r.items()} for r in response.data or []]
            pages += 1
            rows += len(records)
            page = QueryPage(records, list(columns) if columns is not None else list(records[0]) if records else [],
                             response.warnings, response.total)
            next_page = response.next_page
            del response  # hold one page only
            if pages % 10 == 0 or not next_page:
                elapsed = max(time.monotonic() - started, 1e-9)
                log.info("%s: %d pages, %d rows read (%.0f rows/s)", what, pages, rows, rows / elapsed)
            yield page
            if not next_page:
                return
            response = self._call(method, next_page, kind)

    def get_record(self, object_name: str, record_id: str) -> dict:
        return self._call("GET", f"vobjects/{object_name}/{record_id}", "get").data

    def object_metadata(self, object_name: str) -> dict:
        """The object's metadata (name, fields with type/unique/required/picklist, ...)."""
        body = self._call("GET", f"metadata/vobjects/{object_name}", "metadata").body
        return body.get("object", body)

    def object_type(self, object_name: str, type_name: str) -> dict:
        """An object type's configuration (name, label, active, ...): Vault's configuration API."""
        return self._call("GET", f"configuration/Objecttype.{object_name}.{type_name}", "metadata").data or {}

    def picklist_values(self, picklist_name: str) -> list[str]:
        body = self._call("GET", f"objects/picklists/{picklist_name}", "picklist").body
        return [value["name"] for value in body.get("picklistValues", [])]

    def my_permissions(self, object_name: str) -> dict:
        """The integration user's object actions on `object_name`, e.g. {"read": True, ...}.

        Object-type level permissions, when Vault reports them, come under "object_types":
        {"clinical_activity__v": {"read": True, "create": True, ...}}.
        """
        response = self._call(
            "GET", "objects/users/me/permissions", "permissions",
            params={"filter": f"name__v::object.{object_name}.object_actions"},
        )
        return _permissions_of(object_name, response.data or [])

    # -- writing ---------------------------------------------------------------------------------

    def upsert(self, object_name: str, records: list[dict], id_param: str, batch_size: int = MAX_BATCH,
               retry: bool = True) -> list[RecordOutcome]:
        """Create or update by the unique field `id_param`; one outcome per record, input order.
        With `retry=False` a transient fault of the call is raised, not re-sent (the caller
        decides what to send again: see engine.load.upsert)."""
        return self._write("POST", object_name, records, batch_size, "upsert", {"idParam": id_param}, retry)

    def create(self, object_name: str, records: list[dict], batch_size: int = MAX_BATCH) -> list[RecordOutcome]:
        return self._write("POST", object_name, records, batch_size, "create")

    def update(self, object_name: str, records: list[dict], batch_size: int = MAX_BATCH) -> list[RecordOutcome]:
        """Update records by their "id"; one outcome per record, input order."""
        return self._write("PUT", object_name, records, batch_size, "update")

    def _write(self, method: str, object_name: str, records: Iterable[dict], batch_size: int,
               operation: str, params: dict | None = None, retry: bool = True) -> list[RecordOutcome]:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH}, not {batch_size}")
        records = [_json_ready(record) for record in records]
        outcomes: list[RecordOutcome | None] = [None] * len(records)
        started = time.monotonic()
        for start in range(0, len(records), batch_size):
            batch = list(range(start, min(start + batch_size, len(records))))
            try:
                self._write_batch(method, object_name, records, batch, operation, params, outcomes, retry)
            except VaultTransientError as exc:
                settled = {i: o for i, o in enumerate(outcomes) if o is not None}
                if not settled:
                    raise
                raise VaultPartialWrite(exc, settled, [i for i, o in enumerate(outcomes) if o is None]) from exc
            done = batch[-1] + 1
            self._count("records_written", len(batch))
            elapsed = max(time.monotonic() - started, 1e-9)
            log.info("%s %s: %d/%d records (%.0f records/s)", operation, object_name, done, len(records), done / elapsed)
        missing = [i for i, o in enumerate(outcomes) if o is None]
        if missing:  # each batch fills its slots or raises: a gap is a bug, never a silent drop
            raise RuntimeError(f"{object_name}: no outcome for records {missing[:5]}")
        return cast(list[RecordOutcome], outcomes)

    def _write_batch(self, method, object_name, records, batch, operation, params, outcomes, retry) -> None:
        """One write call for `batch` (indices into records); records that hit RACE_CONDITION are
        sent again on their own a few times before they are reported failed."""
        pending = batch
        for round_number in range(self.race_retries + 1):
            try:
                response = self._call(
                    method, f"vobjects/{object_name}", "write", retry=retry,
                    json=[records[i] for i in pending], params=params, record_results=True,
                )
            except VaultInvalidDataError as exc:  # the whole batch refused, e.g. duplicate idParam
                for i in pending:
                    outcomes[i] = RecordOutcome(i, records[i].get("id"), "failed", exc.error_type, exc.message)
                return
            results = response.data or []
            if len(results) != len(pending):
                raise VaultError("UNEXPECTED_RESPONSE", f"{len(results)} results for {len(pending)} records")
            raced = []
            for i, result in zip(pending, results):
                outcome = _outcome(i, result, operation, records[i])
                self._report_warnings(outcome.warnings, f"{operation} {object_name}")
                if outcome.error_type == "RACE_CONDITION" and round_number < self.race_retries:
                    raced.append(i)
                else:
                    outcomes[i] = outcome
            if not raced:
                return
            self._count("race_retry", len(raced))
            log.info("%d records of %s hit RACE_CONDITION; sending them again", len(raced), object_name)
            self.pause(min(self.backoff_max, self.backoff_initial * 2**round_number))
            pending = raced


# -- helpers ---------------------------------------------------------------------------------------

def _path_only(path: str) -> str:
    return path.split("?", 1)[0]


def _minutes(value: str | None) -> float | None:
    """The expected downtime header as minutes (fractions accepted), None when absent or unreadable."""
    try:
        return max(0.0, float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def _flatten(value: Any) -> Any:
    """Vault returns picklist values as arrays: ["phone__v"] -> "phone__v", [] -> None."""
    if isinstance(value, list):
        if len(value) == 1:
            return value[0]
        if not value:
            return None
    return value


def _json_ready(record: dict) -> dict:
    """A record as JSON Vault accepts: dates as text, NaN/NaT as null, numpy scalars as Python."""
    return {key: _json_value(value) for key, value in record.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing values, should one get here
        return None
    if hasattr(value, "item") and not isinstance(value, date):  # numpy scalar
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, datetime):
        return vault_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
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
    warnings = VaultWarning.all_of(result)
    if status in ("SUCCESS", "WARNING"):
        if any(w.type == NO_DATA_CHANGES for w in warnings):
            return RecordOutcome(index, record_id, "unchanged", warnings=warnings)
        return RecordOutcome(index, record_id, _success_kind(result, data, operation), warnings=warnings)
    errors = result.get("errors") or [{"type": "UNKNOWN", "message": "no error given"}]
    message = "; ".join(e.get("message", "") for e in errors if e.get("message"))
    return RecordOutcome(index, record_id, "failed", errors[0].get("type", "UNKNOWN"), message or None, warnings)


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
