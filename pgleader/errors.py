"""The errors pgleader raises. Each message says what to do about it."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "Fenced",
    "MigrationError",
    "NotLeader",
    "PgLeaderError",
]


class PgLeaderError(Exception):
    """Base class of every error pgleader raises on purpose."""


class ConfigError(PgLeaderError):
    """A setting is missing or impossible (e.g. heartbeat >= lease)."""


class DatabaseUnavailable(PgLeaderError):
    """PostgreSQL could not be reached or refused the connection."""


class MigrationError(PgLeaderError):
    """A migration failed or an applied one was changed on disk."""


class NotLeader(PgLeaderError):
    """This elector does not lead (by its own lease) and must not act."""


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
