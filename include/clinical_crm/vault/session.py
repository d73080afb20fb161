"""Vault sessions shared by every client of one process, per (vault URL, user).

Vault limits `/auth` calls per user and per minute; past the limit logins fail (REFERENCE.md:
login limit). Many connection files share one integration user and their tasks start together,
so clients of the same vault and user share one session: one login serves them all, threads
that find it expired wait for one re-login, and the last client to close ends it.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field


@dataclass
class SharedSession:
    key: tuple[str, ...]
    session_id: str | None = None
    vault_id: str | None = None
    created: float = 0.0           # time.monotonic() of the login
    last_used: float = 0.0         # of the latest call sent with it (Vault's idle clock restarts)
    last_login: float | None = None  # of the latest login attempt (logins are spaced)
    users: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one login at a time


_SESSIONS: dict[tuple[str, ...], SharedSession] = {}
_LOCK = threading.Lock()


def key_of(base_url: str, username: str, password: str) -> tuple[str, ...]:
    """Vault URL, user and a digest of the password: a client with another password never
    borrows a session it could not open itself."""
    return (base_url, username.lower(), hashlib.sha256(password.encode()).hexdigest())


def acquire(base_url: str, username: str, password: str) -> SharedSession:
    """The process's session of this vault and user (new when none), counted as used."""
    key = key_of(base_url, username, password)
    with _LOCK:
        shared = _SESSIONS.setdefault(key, SharedSession(key))
        shared.users += 1
        return shared


def release(shared: SharedSession) -> bool:
    """One client is done with it; True when it was the last (the caller then ends the session)."""
    with _LOCK:
        shared.users = max(0, shared.users - 1)
        if shared.users:
            return False
        if _SESSIONS.get(shared.key) is shared:
            del _SESSIONS[shared.key]
        return True
