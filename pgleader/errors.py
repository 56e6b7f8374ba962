"""The errors pgleader raises. Each message says what to do about it."""

from __future__ import annotations

import random

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "Fenced",
    "MigrationError",
    "NotLeader",
    "PgLeaderError",
    "QueryError",
    "SchemaMissing",
    "TransferRefused",
    "backoff",
    "first_line",
]


class PgLeaderError(Exception):
    """Base class of every error pgleader raises on purpose."""


class ConfigError(PgLeaderError):
    """A setting is missing or impossible (e.g. heartbeat >= lease)."""


class DatabaseUnavailable(PgLeaderError):
    """PostgreSQL could not be reached or refused the connection."""


class MigrationError(PgLeaderError):
    """A migration failed or an applied one was changed on disk."""


class SchemaMissing(MigrationError):
    """The database lacks pgleader's schema, or part of it: run `pgleader migrate`."""


class QueryError(PgLeaderError):
    """A queries file is malformed, or code asked it for a name it does not define."""


class NotLeader(PgLeaderError):
    """This elector does not lead (by its own lease) and must not act."""


class TransferRefused(PgLeaderError):
    """A switchover was refused: its message says why (the target is unknown, not
    alive, may not lead, already leads; or nobody leads)."""


class Fenced(NotLeader):
    """The database says the caller's epoch is no longer current: a newer leader exists."""

    def __init__(self, election: str, epoch: int | None, current: int | None) -> None:
        self.election = election
        self.epoch = epoch
        self.current = current
        super().__init__(
            f"election {election!r}: epoch {epoch} is fenced (current epoch is {current}); "
            "a newer leader exists, do not act"
        )


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (psycopg's span several), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def backoff(attempt: int, *, base: float, cap: float, jitter: float = 0.5) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): base x 2^attempt up
    to `cap`, shortened at random by up to `jitter` of itself so retries spread out."""
    return min(cap, base * 2.0 ** min(attempt, 30)) * random.uniform(1.0 - jitter, 1.0)
