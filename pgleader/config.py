"""Settings and their validation, done once at start-up: the election's timings, and
the kinds of setting (number, text, choice, switch) every flag and PGLEADER_*
variable is parsed as, so that a bad value is one line naming it, never a traceback
and never silently accepted."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgleader.errors import ConfigError

__all__ = [
    "EVICT_AFTER_RANGE",
    "HEARTBEAT_RANGE",
    "LEASE_RANGE",
    "Choice",
    "Dsn",
    "LogLevels",
    "Names",
    "Networks",
    "Number",
    "Setting",
    "Since",
    "Switch",
    "Text",
    "Timings",
    "default_instance_id",
    "env_setting",
    "resolve_dsn",
]

T = TypeVar("T")

# Seconds. Beyond these the election would either burn the database or take
# minutes to notice a dead leader: both mistakes, not choices.
HEARTBEAT_RANGE = (0.05, 60.0)
LEASE_RANGE = (0.1, 600.0)
EVICT_AFTER_RANGE = (0.2, 3600.0)


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
        for name, (low, high) in (
            ("heartbeat", HEARTBEAT_RANGE),
            ("lease", LEASE_RANGE),
            ("evict_after", EVICT_AFTER_RANGE),
        ):
            value = getattr(self, name)
            if not low <= value <= high:  # NaN fails this too
                raise ConfigError(
                    f"{name} must be between {_num(low)} and {_num(high)} s, got {value}"
                )
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
    """The explicit DSN, else PGLEADER_DSN, else DATABASE_URL, else None (an empty
    one counts as unset). ConfigError, naming the variable, when it cannot be parsed."""
    if dsn:
        return dsn
    for name in ("PGLEADER_DSN", "DATABASE_URL"):
        value: str | None = env_setting(name, Dsn(), None)
        if value:
            return value
    return None


def default_instance_id() -> str:
    """hostname-pid; falls back to 'instance' when the hostname cannot be read."""
    try:
        host = socket.gethostname().strip() or "instance"
    except OSError:
        host = "instance"
    return f"{host}-{os.getpid()}"


# -- kinds of setting --------------------------------------------------------------
#
# Each is an argparse `type` (a bad flag: "argument --port: must be ...") and parses
# the PGLEADER_* twin through env_setting (a bad variable: "PGLEADER_PORT: must be ...").


class Setting:
    """How one setting's text becomes its value; raises argparse.ArgumentTypeError
    with a message that completes "<flag or variable>: ..."."""

    #: an empty value means "unset" (e.g. a token: none) instead of being refused
    empty_means_unset = False

    def __call__(self, text: str) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:  # argparse names the type in a few messages
        return type(self).__name__.lower()


class Number(Setting):
    """An int or a float, finite and within [low, high] (or (low, high] when `above`)."""

    def __init__(
        self,
        kind: type[int] | type[float],
        low: float,
        high: float,
        unit: str = "",
        *,
        above: bool = False,
    ) -> None:
        self.kind, self.low, self.high, self.unit, self.above = kind, low, high, unit, above

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a number"
        unit = f" {self.unit}" if self.unit else ""
        if self.above:
            return f"{what} above {_num(self.low)} and at most {_num(self.high)}{unit}"
        return f"{what} from {_num(self.low)} to {_num(self.high)}{unit}"

    def __call__(self, text: str) -> int | float:
        value: int | float
        try:
            value = self.kind(text.strip())
        except ValueError:
            value = math.nan
        if (
            not math.isfinite(value)
            or not self.low <= value <= self.high
            or (self.above and value == self.low)
        ):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


class Text(Setting):
    """A non-empty line of at most `max_length` characters; `secret` ones are never
    echoed in a message. With `empty_means_unset`, an empty value is accepted as ""
    (so an empty flag still overrides its variable) and means "none"."""

    def __init__(
        self, max_length: int = 1000, *, secret: bool = False, empty_means_unset: bool = False
    ) -> None:
        self.max_length, self.secret = max_length, secret
        self.empty_means_unset = empty_means_unset

    def __call__(self, text: str) -> str:
        if not text:
            if self.empty_means_unset:
                return ""
            raise argparse.ArgumentTypeError("must not be empty")
        if len(text) > self.max_length or any(c in text for c in "\0\n\r"):
            shown = "" if self.secret else f", got {text[:40]!r}"
            raise argparse.ArgumentTypeError(
                f"must be one line of at most {self.max_length} characters{shown}"
            )
        return text


class Choice(Setting):
    """One of a fixed set of words."""

    def __init__(self, *choices: str) -> None:
        self.choices = choices

    def __call__(self, text: str) -> str:
        if text not in self.choices:
            raise argparse.ArgumentTypeError(
                f"must be one of {', '.join(self.choices)}, got {text[:40]!r}"
            )
        return text


_SWITCH_WORDS = {"true": True, "1": True, "yes": True, "on": True,
                 "false": False, "0": False, "no": False, "off": False}  # fmt: skip


class Switch(Setting):
    """true/false (also 1/0, yes/no, on/off): the PGLEADER_* twin of a --no-... flag."""

    def __call__(self, text: str) -> bool:
        try:
            return _SWITCH_WORDS[text.strip().lower()]
        except KeyError:
            raise argparse.ArgumentTypeError(f"must be true or false, got {text[:40]!r}") from None


class Names(Setting):
    """A comma-separated list naming at least one thing; upper-cased."""

    def __call__(self, text: str) -> frozenset[str]:
        names = frozenset(s.strip().upper() for s in text.split(",") if s.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"must name at least one, got {text[:40]!r}")
        return names


class Networks(Setting):
    """A comma-separated list of addresses or networks (10.0.0.0/8), at least one."""

    def __call__(self, text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            networks = tuple(
                ipaddress.ip_network(s.strip(), strict=False) for s in text.split(",") if s.strip()
            )
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not networks:
            raise argparse.ArgumentTypeError(f"must name at least one network, got {text[:40]!r}")
        return networks


class Instant(Setting):
    """An ISO 8601 time with its time zone (2026-12-24T10:00+05:30, or Z for UTC)."""

    def __call__(self, text: str) -> datetime:
        try:
            value = datetime.fromisoformat(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an ISO time such as 2026-12-24T10:00+05:30, got {text!r}"
            ) from None
        if value.tzinfo is None:
            raise argparse.ArgumentTypeError(f"give its time zone (+05:30, Z), got {text!r}")
        return value


_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SINCE_MAX = timedelta(days=3650)


class Since(Setting):
    """How far back to look: a duration (90s, 30m, 2h, 1d) counted back from now by
    the database's clock (a timedelta), or an ISO 8601 time (a datetime; without its
    time zone, this machine's local time, as the tables print times)."""

    def __call__(self, text: str) -> datetime | timedelta:
        duration = _DURATION.fullmatch(text.strip())
        if duration:
            seconds = int(duration[1]) * _UNIT_SECONDS[duration[2]]
            if not 0 < seconds <= SINCE_MAX.total_seconds():
                raise argparse.ArgumentTypeError(
                    f"must be a duration above 0 and at most {SINCE_MAX.days}d, got {text[:40]!r}"
                )
            return timedelta(seconds=seconds)
        try:
            instant = datetime.fromisoformat(text.strip())
            return instant if instant.tzinfo is not None else instant.astimezone()
        except (ValueError, OverflowError, OSError):  # astimezone: out of the platform's range
            raise argparse.ArgumentTypeError(
                "must be a duration such as 90s, 30m, 2h, 1d or an ISO time such as"
                f" 2026-12-24T10:00+05:30, got {text[:40]!r}"
            ) from None


class Dsn(Setting):
    """A libpq connection string or URL; never echoed (it may carry a password).
    Empty means unset (then the next source, or the embedded server)."""

    empty_means_unset = True

    def __call__(self, text: str) -> str | None:
        if not text:
            return None
        try:
            conninfo_to_dict(text)
        except psycopg.ProgrammingError:
            raise argparse.ArgumentTypeError(
                "not a PostgreSQL connection string (key=value ... or postgresql://...)"
            ) from None
        return text


def env_setting(name: str, parse: Callable[[str], T | None], default: T) -> T:
    """The environment variable `name` parsed by `parse`; `default` when it is unset
    (or empty, for a setting where empty means unset). ConfigError naming the
    variable when its value is refused."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return default if value is None else value


def _num(value: float) -> str:
    """1.0 -> '1', 0.05 -> '0.05', 65536 -> '65536'."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
