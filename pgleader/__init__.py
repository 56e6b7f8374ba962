"""Leader election and epoch fencing on nothing but PostgreSQL.

A session advisory lock decides who leads; the epoch row, bumped only by the
lock holder, fences every action the leader takes. Knows nothing of trading.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pgleader.config import LogLevels, Timings  # noqa: E402
from pgleader.errors import (  # noqa: E402
    ConfigError,
    DatabaseUnavailable,
    Fenced,
    MigrationError,
    NotLeader,
    PgLeaderError,
)
from pgleader.election import Elector, Transition  # noqa: E402
from pgleader.fencing import check_epoch  # noqa: E402
from pgleader.migrations import migrate  # noqa: E402

__all__ = [
    "ConfigError",
    "DatabaseUnavailable",
    "Elector",
    "Fenced",
    "LogLevels",
    "MigrationError",
    "NotLeader",
    "PgLeaderError",
    "Timings",
    "Transition",
    "__version__",
    "check_epoch",
    "migrate",
]
