"""Leader election and epoch fencing on nothing but PostgreSQL.

A session advisory lock decides who leads; the epoch row, bumped only by the
lock holder, fences every action the leader takes. Knows nothing of trading.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pgleader.config import LogLevels, Timings
from pgleader.election import Elector, Transition
from pgleader.errors import (
    ConfigError,
    DatabaseUnavailable,
    Fenced,
    MigrationError,
    NotLeader,
    PgLeaderError,
    SchemaMissing,
    TransferRefused,
)
from pgleader.fencing import check_epoch, fenced_statement
from pgleader.migrations import migrate

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "Elector",
    "Fenced",
    "LogLevels",
    "MigrationError",
    "NotLeader",
    "PgLeaderError",
    "SchemaMissing",
    "Timings",
    "TransferRefused",
    "Transition",
    "__version__",
    "check_epoch",
    "fenced_statement",
    "migrate",
]
