"""Sessions, rate limits, request counters, fault injection and latency of one sandbox process."""
from __future__ import annotations

import random
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

FAULT_KINDS = ("exception", "http502", "http503", "drop", "slow", "session_expiry", "race_condition")
CALL_FAULTS = tuple(k for k in FAULT_KINDS if k != "race_condition")


@dataclass
class Session:
    session_id: str
    user_id: str
    profile: str
    username: str
    last_used: float
    created: float


class Sessions:
    MAX_AGE_SECONDS = 48 * 3600  # Vault's cap, whatever the activity (shorter in tests)

    def __init__(self, idle_seconds: float, max_age_seconds: float = MAX_AGE_SECONDS):
        self.idle_seconds = idle_seconds
        self.max_age_seconds = max_age_seconds
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, user_id: str, profile: str, username: str) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_hex(32).upper(), user_id, profile, username, now, now)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def touch(self, session_id: str | None) -> Session | None:
        """The live session for this id (its idle clock restarted), or None when unknown or expired."""
        if not session_id:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if now - session.last_used > self.idle_seconds or now - session.created > self.max_age_seconds:
                del self._sessions[session_id]
                return None
            session.last_used = now
            return session

    def end(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def expire_all(self, except_id: str | None = None) -> int:
        with self._lock:
            doomed = [s for s in self._sessions if s != except_id]
            for s in doomed:
                del self._sessions[s]
            return len(doomed)


class FixedWindow:
    """Calls per fixed window aligned to the clock (Vault's burst window is 5 minutes)."""

    def __init__(self, limit: int, seconds: float):
        self.limit = limit
        self.seconds = seconds
        self._window = None
        self.count = 0
        self._lock = threading.Lock()

    def hit(self) -> int:
        """Count one call; return how many calls remain in this window (negative past the limit)."""
        with self._lock:
            window = int(time.time() // self.seconds)
            if window != self._window:
                self._window, self.count = window, 0
            self.count += 1
            return self.limit - self.count

    def remaining(self) -> int:
        with self._lock:
            window = int(time.time() // self.seconds)
            return self.limit if window != self._window else self.limit - self.count

    def reset(self) -> None:
        with self._lock:
            self._window, self.count = None, 0


class PerKeyWindow(FixedWindow):
    """A FixedWindow per key (Vault's login limit is per user): one limit and length for all."""

    def __init__(self, limit: int, seconds: float):
        super().__init__(limit, seconds)
        self._counts: dict[str, int] = {}
        self._counted_in: int | None = None

    def hit(self, key: str = "") -> int:
        with self._lock:
            window = int(time.time() // self.seconds)
            counts = self._counts if self._counted_in == window else {}
            self._counts, self._counted_in = counts, window
            counts[key] = counts.get(key, 0) + 1
            return self.limit - counts[key]

    def remaining(self, key: str = "") -> int:
        with self._lock:
            window = int(time.time() // self.seconds)
            used = self._counts.get(key, 0) if self._counted_in == window else 0
            return self.limit - used

    def reset(self) -> None:
        with self._lock:
            self._counts, self._counted_in = {}, None


@dataclass
class FaultConfig:
    rate: float = 0.0
    kinds: list[str] = field(default_factory=lambda: list(FAULT_KINDS))
    seed: int = 0
    slow_seconds: float = 3.0
    queue: list[str] = field(default_factory=list)   # forced faults for the next calls, in order


class Faults:
    """Seeded fault decisions; the same seed and call sequence give the same faults."""

    def __init__(self, config: FaultConfig):
        self._lock = threading.Lock()
        self.configure(config)
        self.counts: Counter = Counter()

    def configure(self, config: FaultConfig) -> None:
        unknown = [k for k in config.kinds + config.queue if k not in FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
        if not 0.0 <= config.rate <= 1.0:
            raise ValueError("fault rate must be between 0 and 1")
        with self._lock:
            self.config = config
            self.rng = random.Random(config.seed)
            self._force_race = False      # a queued race_condition waits for the next write call

    def for_call(self, is_write: bool) -> str | None:
        """The call-level fault for this call, if any (race conditions are decided per record)."""
        with self._lock:
            if self.config.queue:
                kind = self.config.queue[0]
                if kind != "race_condition" or is_write:
                    self.config.queue.pop(0)
                    if kind != "race_condition":
                        self.counts[kind] += 1
                        return kind
                    self._force_race = True
                return None
            kinds = [k for k in self.config.kinds if k in CALL_FAULTS]
            if kinds and self.config.rate and self.rng.random() < self.config.rate:
                kind = self.rng.choice(kinds)
                self.counts[kind] += 1
                return kind
            return None

    def race_for_record(self) -> bool:
        with self._lock:
            if self._force_race:
                self._force_race = False
                self.counts["race_condition"] += 1
                return True
            if "race_condition" in self.config.kinds and self.config.rate \
                    and self.rng.random() < self.config.rate:
                self.counts["race_condition"] += 1
                return True
            return False

    def describe(self) -> dict:
        c = self.config
        return {"rate": c.rate, "kinds": c.kinds, "seed": c.seed, "slow_seconds": c.slow_seconds,
                "queue": list(c.queue)}


_VERSION = re.compile(r"^/api/v\d+(\.\d+)?(?=/)")
_QUERY_ID = re.compile(r"^(/api/\{version\}/query)/[^/]+$")
_RECORD_ID = re.compile(r"^(/api/\{version\}/vobjects/[^/]+)/[^/]+$")


def call_kind(method: str, path: str) -> str:
    """Which latency an API call gets: auth, query, query_page, write, deletions or metadata (every
    other call: metadata, single records, users, configuration, keep-alive)."""
    verb, route = endpoint_key(method, path).split(" ", 1)
    if route == "/api/{version}/auth":
        return "auth"
    if route == "/api/{version}/query":
        return "query"
    if route == "/api/{version}/query/{query_id}":
        return "query_page"
    if route.startswith("/api/{version}/objects/deletions/"):
        return "deletions"
    if route.startswith("/api/{version}/vobjects/") and verb in ("POST", "PUT", "DELETE"):
        return "write"
    return "metadata"


def endpoint_key(method: str, path: str) -> str:
    """'POST /api/v25.2/query/abc' -> 'POST /api/{version}/query/{query_id}' (objects stay named)."""
    path = _VERSION.sub("/api/{version}", path.rstrip("/") or "/")
    path = _QUERY_ID.sub(r"\1/{query_id}", path)
    path = _RECORD_ID.sub(r"\1/{id}", path)
    return f"{method} {path}"


class RequestCounters:
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.endpoints: Counter = Counter()
            self.auth = 0
            self.total = 0
            self.delayed = 0      # calls delayed past the burst limit (X-VaultAPI-ResponseDelay)
            self.invalid_session = 0  # calls refused with INVALID_SESSION_ID (expired or unknown)
            self.maintenance = 0      # calls answered with the downtime error
            # X-VaultAPI-ReferenceID of each call (auth included) -> calls; "" for calls without
            self.references: Counter = Counter()

    def count(self, key: str, is_auth: bool, reference_id: str = "") -> None:
        with self._lock:
            self.references[reference_id] += 1
            if is_auth:
                self.auth += 1
            else:
                self.endpoints[key] += 1
                self.total += 1

    def count_invalid_session(self) -> None:
        with self._lock:
            self.invalid_session += 1

    def count_maintenance(self) -> None:
        with self._lock:
            self.maintenance += 1

    def count_delayed(self) -> None:
        """One call delayed because it came past the burst limit."""
        with self._lock:
            self.delayed += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"total": self.total, "auth": self.auth, "delayed": self.delayed,
                    "invalid_session": self.invalid_session, "maintenance": self.maintenance,
                    "endpoints": dict(sorted(self.endpoints.items())),
                    "references": dict(sorted(self.references.items()))}


class Downtime:
    """A simulated maintenance window: until it ends every API call answers the downtime error
    with the minutes left in `X-VaultAPI-DowntimeExpectedDurationMinutes`."""

    def __init__(self):
        self._until = 0.0
        self._lock = threading.Lock()

    def start(self, seconds: float) -> None:
        with self._lock:
            self._until = time.monotonic() + max(0.0, seconds)

    def minutes_left(self) -> float | None:
        """Minutes left (fractions kept, for tests' short windows), None outside a window."""
        with self._lock:
            left = self._until - time.monotonic()
        return left / 60 if left > 0 else None


# ---------------------------------------------------------------------------------------------
# latency


@dataclass
class LatencyProfile:
    """Delay of each kind of call (see `call_kind`), in milliseconds; a write call also costs
    `write_per_record_ms` per record. Each delay varies by up to ±`jitter` (0.25 = ±25 %)."""
    name: str = "none"
    auth_ms: float = 0
    query_ms: float = 0            # a query's first page
    query_page_ms: float = 0       # each next_page
    write_ms: float = 0
    write_per_record_ms: float = 0
    deletions_ms: float = 0
    metadata_ms: float = 0         # and every other call
    jitter: float = 0.0


# ASSUMED figures, to be replaced by ones measured on a real vault (docs/sandbox.md).
VAULT_LATENCY = {"auth_ms": 400, "query_ms": 300, "query_page_ms": 300, "write_ms": 300, "write_per_record_ms": 2,
                 "deletions_ms": 300, "metadata_ms": 200, "jitter": 0.25}
LATENCY_KEYS = tuple(f.name for f in fields(LatencyProfile) if f.name != "name")


def latency_values(values: dict, where: str) -> dict:
    """`values` checked against LatencyProfile's keys; errors name `where` and the key."""
    for key, value in values.items():
        if key not in LATENCY_KEYS:
            raise ValueError(f"{where}: unknown key '{key}'; known keys: {', '.join(LATENCY_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{where}: key '{key}' must be a number >= 0, not {value!r}")
    if values.get("jitter", 0) >= 1:
        raise ValueError(f"{where}: key 'jitter' must be below 1 (a fraction: 0.25 = ±25 %)")
    return values


def latency_profile(spec: str) -> LatencyProfile:
    """`none`, `vault` (VAULT_LATENCY) or the path of a YAML or JSON file holding some of the
    LATENCY_KEYS (missing ones are 0)."""
    if spec == "none":
        return LatencyProfile()
    if spec == "vault":
        return LatencyProfile("vault", **VAULT_LATENCY)
    where = f"latency profile {spec}"
    try:
        raw = yaml.safe_load(Path(spec).read_text())      # JSON is YAML too
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror}); use none, vault or a YAML/JSON file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML/JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of {', '.join(LATENCY_KEYS)}")
    return LatencyProfile(spec, **latency_values(raw, where))


class Latency:
    """The active latency profile and its seeded jitter (same seed + same calls = same delays)."""

    def __init__(self, profile: LatencyProfile, seed: int = 0):
        self._lock = threading.Lock()
        self.configure(profile, seed)

    def configure(self, profile: LatencyProfile, seed: int) -> None:
        with self._lock:
            self.profile, self.seed, self.rng = profile, seed, random.Random(seed)

    def seconds(self, kind: str, records: int = 0) -> float:
        """The delay of one call of this kind (`records`: the records of a write call)."""
        with self._lock:
            p = self.profile
            ms = getattr(p, f"{kind}_ms") + (p.write_per_record_ms * records if kind == "write" else 0)
            if ms and p.jitter:
                ms *= 1 + self.rng.uniform(-p.jitter, p.jitter)
        return ms / 1000

    def describe(self) -> dict:
        with self._lock:
            values = asdict(self.profile)
            return {"profile": values.pop("name"), "seed": self.seed, **values}
