"""Election settings and their validation, done once at start-up."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from pgleader.errors import ConfigError

__all__ = ["LogLevels", "Timings", "default_instance_id", "resolve_dsn"]


@dataclass(frozen=True, slots=True)
class Timings:
    """How often the leader proves it is alive, and when others give up on it (seconds).

    - heartbeat: the leader's beat on its lock session; also how often a
      waiting follower looks for a hung leader.
    - lease: the leader stops acting when no beat succeeded for this long, by
      its own monotonic clock, counted from when the last good beat was *sent*.
    - evict_after: followers terminate the leader's session when its last beat
      is older than this by the database clock.
    """

    heartbeat: float = 1.0
    lease: float = 3.0
    evict_after: float = 6.0

    def validate(self) -> Timings:
        if not 0.05 <= self.heartbeat <= 60:
            raise ConfigError(f"heartbeat must be between 0.05 and 60 s, got {self.heartbeat}")
        # One slow or lost beat must not cost a healthy leader its lease (river #216).
        if self.lease < 2 * self.heartbeat:
            raise ConfigError(
                f"lease ({self.lease} s) must be at least twice the heartbeat ({self.heartbeat} s)"
            )
        # The leader must have stepped down by its own clock before anyone evicts it:
        # its lease runs from the *send* time of its last good beat, the database
        # stamps that beat later, and a follower looks only once per heartbeat.
        # Two beats of margin cover a beat in flight plus a follower's poll.
        if self.evict_after < self.lease + 2 * self.heartbeat:
            raise ConfigError(
                f"evict_after ({self.evict_after} s) must be at least lease + 2 x heartbeat "
                f"({self.lease + 2 * self.heartbeat} s) so a leader steps down before it is evicted"
            )
        return self


@dataclass(frozen=True, slots=True)
class LogLevels:
    """Log levels of leadership events; operators page on ERROR and CRITICAL."""

    gained: int = logging.ERROR
    lost: int = logging.CRITICAL
    resigned: int = logging.ERROR
    heartbeat_failed: int = logging.WARNING


def resolve_dsn(dsn: str | None = None) -> str | None:
    """The explicit DSN, else PGLEADER_DSN, else DATABASE_URL, else None."""
    return dsn or os.environ.get("PGLEADER_DSN") or os.environ.get("DATABASE_URL") or None


def default_instance_id() -> str:
    """hostname-pid; falls back to 'instance' when the hostname cannot be read."""
    try:
        host = socket.gethostname().strip() or "instance"
    except OSError:
        host = "instance"
    return f"{host}-{os.getpid()}"
