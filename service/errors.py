"""The errors the gateway raises on purpose, in one place.

Each one says what happened in words an operator or an alert's author can act
on; the HTTP layer turns them into answers, never into tracebacks.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import PoolTimeout

__all__ = [
    "DATABASE_UNAVAILABLE",
    "BrokerError",
    "BrokerModeMismatch",
    "BrokerRefused",
    "BrokerUnavailable",
    "GatewayError",
    "SignalError",
    "SpoolError",
]

# What "the database cannot be reached right now" looks like from a pool: retry,
# spool, or answer 503; never a crash. A server that refuses a write as read-only (a
# standby, or an old primary fenced with default_transaction_read_only) is no
# primary: the same.
DATABASE_UNAVAILABLE: tuple[
    type[psycopg.OperationalError], type[PoolTimeout], type[psycopg.errors.ReadOnlySqlTransaction]
] = (
    psycopg.OperationalError,
    PoolTimeout,
    psycopg.errors.ReadOnlySqlTransaction,
)


class GatewayError(Exception):
    """Base class of the gateway's own errors."""


class SignalError(GatewayError, ValueError):
    """A body that cannot become a signal; `field` is None for body-level problems."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"status": "invalid", "error": self.message, "field": self.field}


class SpoolError(GatewayError):
    """The spool did not take the signal: it is NOT safe (answer 503).

    `reason`: spool_full (the byte cap), disk_full (no space, or a file-size
    limit), spool_busy (another process held the file too long), spool_error.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def full(self) -> bool:
        return self.reason in ("spool_full", "disk_full")


class BrokerError(GatewayError):
    """Something the broker said or did not say; the message never holds a secret."""


class BrokerUnavailable(BrokerError):
    """The broker could not be asked or did not answer: the outcome is unknown."""


class BrokerRefused(BrokerError):
    """The broker placed nothing and said so; ask again after `retry_after` seconds.

    `reason`: rate_limited (HTTP 429) or unauthorised (HTTP 403: a bad API key, or
    the broker session behind it expired; critical, a human must log in again).
    """

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


class BrokerModeMismatch(BrokerError):
    """The broker answered in another mode than configured (analyze vs live)."""
