"""Vault's failures as exceptions, and the one table that maps Vault error types onto them.

Airflow tasks fail fast (no retries) on VaultAuthenticationError and VaultPermissionError:
retrying cannot fix a wrong password or a missing permission.
"""
from __future__ import annotations


class VaultError(Exception):
    """A Vault call failed. `error_type` is Vault's error type (e.g. INVALID_DATA)."""

    def __init__(self, error_type: str, message: str = ""):
        self.error_type = error_type
        self.message = message
        super().__init__(f"{error_type}: {message}" if message else error_type)


class VaultAuthenticationError(VaultError):
    """Wrong credentials, or a session that could not be renewed."""


class VaultPermissionError(VaultError):
    """The integration user lacks a permission."""


class VaultInvalidDataError(VaultError):
    """Vault rejected the data of a request (a permanent fault of that request)."""


class VaultQueryError(VaultError):
    """A VQL query is malformed or names something that does not exist."""


class VaultRateLimitError(VaultError):
    """An API limit was exceeded (e.g. the 1-minute auth limit)."""


class VaultTransientError(VaultError):
    """A fault worth retrying: EXCEPTION envelopes, 5xx, dropped connections, timeouts."""


class VaultMaintenanceError(VaultTransientError):
    """Vault answered an error announcing downtime (`X-VaultAPI-DowntimeExpectedDurationMinutes`):
    the client waits that long once instead of spending its retries."""

    def __init__(self, minutes: float, message: str = ""):
        super().__init__("MAINTENANCE", f"Vault is down for maintenance, expected {minutes:g} min; {message}")
        self.minutes = minutes
        self.seconds = minutes * 60


class VaultPartialWrite(VaultTransientError):
    """A write that failed transiently after some of its records were settled (e.g. the re-send
    of the records that hit RACE_CONDITION got no answer): `settled` maps input positions to
    their RecordOutcome, `pending` lists the positions still to send. Re-send only `pending`:
    the settled records were written (or refused) already."""

    def __init__(self, cause: VaultTransientError, settled: dict, pending: list[int]):
        super().__init__(cause.error_type, cause.message)
        self.settled = settled
        self.pending = pending


ERROR_TYPES: dict[str, type[VaultError]] = {
    "INVALID_SESSION_ID": VaultAuthenticationError,
    "USERNAME_OR_PASSWORD_INCORRECT": VaultAuthenticationError,
    "PASSWORD_CHANGE_REQUIRED": VaultAuthenticationError,
    "USER_LOCKED_OUT": VaultAuthenticationError,
    "INSUFFICIENT_ACCESS": VaultPermissionError,
    "INVALID_DATA": VaultInvalidDataError,
    "PARAMETER_REQUIRED": VaultInvalidDataError,
    "OPERATION_NOT_ALLOWED": VaultInvalidDataError,
    "ATTRIBUTE_NOT_SUPPORTED": VaultInvalidDataError,
    "MALFORMED_URL": VaultInvalidDataError,
    "METHOD_NOT_SUPPORTED": VaultInvalidDataError,
    "INVALID_FILTER": VaultQueryError,
    "INCORRECT_QUERY_SYNTAX_ERROR": VaultQueryError,
    "API_LIMIT_EXCEEDED": VaultRateLimitError,
    "EXCEPTION": VaultTransientError,
    "UNEXPECTED_ERROR": VaultTransientError,
}


def error_for(error_type: str, message: str = "") -> VaultError:
    """The exception for a Vault error type; unknown types give a plain VaultError."""
    return ERROR_TYPES.get(error_type, VaultError)(error_type, message)
