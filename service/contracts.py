"""Futures contract calendars: which contract is current on a day, and its symbol.

An exchange's calendar (trading weekdays, holidays, session hours, time zone) and a
contract rule (the underlying, when it expires, how early to roll) together answer
"which contract should new positions use today?" for the rollover job and the
instruments file. In the file they read:

    [calendars.NFO]
    holidays = [2026-01-26, "2026-03-03"]    # TOML dates or "YYYY-MM-DD" strings
    session = "09:15-15:30"                  # the default; local time
    timezone = "Asia/Kolkata"                # the default
    weekdays = ["Mon", "Tue", "Wed", "Thu", "Fri"]

    [instruments."NIFTY1!"]
    exchange = "NFO"
    underlying = "NIFTY"
    expiry = "last-tuesday"                  # or expiries = [2026-05-19, ...] (MCX)
    roll_days_before = 2                     # trading days

An expiry on a holiday or a non-trading weekday moves to the previous trading day.
Contract E's roll window is [roll_start(E), E]: within it, new entries and rolled
positions go to the next contract. Everything here is pure: no I/O and no clock;
every function takes the day or the instant it works on.
"""

from __future__ import annotations

import json
import re
from calendar import monthrange
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from itertools import pairwise, takewhile
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pgleader.errors import ConfigError

__all__ = [
    "EXPIRY_RULES",
    "MAX_ROLL_DAYS",
    "Calendar",
    "Contract",
    "ContractError",
    "ContractRule",
    "contract_symbol",
    "parse_calendar",
    "parse_contract",
]

EXPIRY_RULES: Final = {
    "last-monday": 0,
    "last-tuesday": 1,  # NSE index futures since September 2025
    "last-wednesday": 2,
    "last-thursday": 3,  # BSE
    "last-friday": 4,
}
MAX_ROLL_DAYS: Final = 20

_MONTHS: Final = (
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
)  # fmt: skip
_DEFAULT_TIMEZONE: Final = "Asia/Kolkata"
_DEFAULT_SESSION: Final = (time(9, 15), time(15, 30))
_DEFAULT_WEEKDAYS: Final = frozenset({0, 1, 2, 3, 4})  # Monday to Friday
_DAYS: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_CALENDAR_KEYS: Final = ("holidays", "session", "timezone", "weekdays")
_UNDERLYING: Final = re.compile(r"[A-Z0-9][A-Z0-9&-]*")
_ISO_DATE: Final = re.compile(r"\d{4}-\d{2}-\d{2}")
_SESSION: Final = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


class ContractError(ConfigError):
    """The calendar cannot answer: an explicit list of expiries has run out."""


@dataclass(frozen=True, slots=True)
class Calendar:
    """An exchange's trading days and session hours, in its own time zone."""

    exchange: str
    timezone: str = _DEFAULT_TIMEZONE
    session: tuple[time, time] = _DEFAULT_SESSION
    holidays: frozenset[date] = frozenset()
    weekdays: frozenset[int] = _DEFAULT_WEEKDAYS  # Monday is 0

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            # A slim container image may lack the time zone database altogether.
            hint = "" if available_timezones() else ": no time zone database, install tzdata"
            raise ConfigError(
                f"timezone {_show(self.timezone)} is not an IANA time zone name"
                f" (e.g. Asia/Kolkata){hint}"
            ) from None
        opens, closes = self.session
        if closes <= opens:
            raise ConfigError(
                f"session must close after it opens, got {opens:%H:%M}-{closes:%H:%M}"
            )
        # Without a trading weekday, previous_trading_day would search forever.
        if not self.weekdays or not self.weekdays <= set(range(7)):
            raise ConfigError("weekdays must name at least one of Mon Tue Wed Thu Fri Sat Sun")

    def is_trading_day(self, day: date) -> bool:
        return day.weekday() in self.weekdays and day not in self.holidays

    def previous_trading_day(self, day: date) -> date:
        """The last trading day on or before `day`."""
        while not self.is_trading_day(day):
            day -= timedelta(days=1)
        return day

    def trading_days_before(self, day: date, n: int) -> date:
        """The trading day `n` trading days before previous_trading_day(day)."""
        if n < 0:
            raise ValueError(f"trading_days_before: n must be 0 or more, got {n}")
        day = self.previous_trading_day(day)
        for _ in range(n):
            day = self.previous_trading_day(day - timedelta(days=1))
        return day

    def in_session(self, at: datetime) -> bool:
        """Whether the exchange trades at `at` (time-zone aware): open <= t < close."""
        local = self._local(at)
        opens, closes = self.session
        return self.is_trading_day(local.date()) and opens <= local.time() < closes

    def local_date(self, at: datetime) -> date:
        """The exchange's date at `at` (time-zone aware)."""
        return self._local(at).date()

    def _local(self, at: datetime) -> datetime:
        if at.utcoffset() is None:
            raise ValueError(f"{self.exchange} calendar: {at.isoformat()} has no time zone")
        return at.astimezone(ZoneInfo(self.timezone))


@dataclass(frozen=True, slots=True, order=True)
class Contract:
    """One futures contract: ordered by expiry; symbol in OpenAlgo's format."""

    expiry: date
    symbol: str


@dataclass(frozen=True, slots=True)
class ContractRule:
    """How an underlying's futures expire (a weekday rule or an explicit list) and roll."""

    underlying: str
    expiry: str | None = None
    expiries: tuple[date, ...] = ()
    roll_days_before: int = 0

    def __post_init__(self) -> None:
        if not _UNDERLYING.fullmatch(self.underlying):
            raise ConfigError(
                "underlying must be upper-case letters A-Z, digits, & or - (e.g. NIFTY),"
                f" got {_show(self.underlying)}"
            )
        if self.expiry is not None and self.expiries:
            raise ConfigError("give expiry or expiries, not both")
        if self.expiry is None and not self.expiries:
            raise ConfigError(
                'expiry (e.g. "last-tuesday") or expiries (a list of dates) is required'
            )
        if self.expiry is not None and self.expiry not in EXPIRY_RULES:
            raise ConfigError(
                f"expiry must be one of {' '.join(EXPIRY_RULES)}, got {_show(self.expiry)}"
            )
        for earlier, later in pairwise(self.expiries):
            if later <= earlier:
                raise ConfigError(
                    "expiries must be in ascending order without repeats:"
                    f" {later.isoformat()} comes after {earlier.isoformat()}"
                )
        if not 0 <= self.roll_days_before <= MAX_ROLL_DAYS:
            raise ConfigError(
                f"roll_days_before must be 0 to {MAX_ROLL_DAYS} trading days,"
                f" got {self.roll_days_before}"
            )

    def expiry_dates(self, calendar: Calendar, start: date, months: int = 3) -> list[date]:
        """The expiries on or after `start`, ascending, moved off holidays: for a weekday
        rule those of the `months` months from start's month; for a list, all left."""
        if self.expiry is None:
            return list(self._expiries(calendar, start))
        year, month = divmod(start.year * 12 + start.month - 1 + months, 12)
        end = date(year, month + 1, 1)
        return list(takewhile(lambda day: day < end, self._expiries(calendar, start)))

    def roll_start(self, calendar: Calendar, expiry: date) -> date:
        """The first day of `expiry`'s roll window."""
        return calendar.trading_days_before(expiry, self.roll_days_before)

    def contract_on(self, calendar: Calendar, day: date) -> Contract:
        """The contract new positions use on `day`: the first not yet in its roll window."""
        for expiry in self._expiries(calendar, day):
            if day < self.roll_start(calendar, expiry):
                return Contract(expiry, contract_symbol(self.underlying, expiry))
        raise self._exhausted(day)

    def next_after(self, calendar: Calendar, expiry: date) -> Contract:
        """The contract expiring next after `expiry`."""
        for later in self._expiries(calendar, expiry + timedelta(days=1)):
            return Contract(later, contract_symbol(self.underlying, later))
        raise self._exhausted(expiry)

    def _expiries(self, calendar: Calendar, start: date) -> Iterator[date]:
        """Every expiry on or after `start`, ascending; endless for a weekday rule."""
        if self.expiry is None:
            listed: Iterator[date] = iter(self.expiries)
        else:
            listed = _last_weekdays(start, EXPIRY_RULES[self.expiry])
        previous = None
        for day in listed:
            moved = calendar.previous_trading_day(day)
            if moved >= start and moved != previous:
                yield moved
            previous = moved

    def _exhausted(self, day: date) -> ContractError:
        # Only an explicit list runs out: a weekday rule has an expiry every month.
        return ContractError(
            f"{self.underlying}: its expiries list ends at {self.expiries[-1].isoformat()},"
            f" too early for {day.isoformat()}: add the next expiries to it"
        )


def contract_symbol(underlying: str, expiry: date) -> str:
    """OpenAlgo's futures symbol: NIFTY and 2026-12-29 give NIFTY29DEC26FUT."""
    if not _UNDERLYING.fullmatch(underlying):
        raise ValueError(f"contract_symbol: {underlying!r} is not an upper-case underlying")
    return f"{underlying}{expiry.day:02d}{_MONTHS[expiry.month - 1]}{expiry.year % 100:02d}FUT"


def parse_calendar(where: str, exchange: str, table: object) -> Calendar:
    """The calendar of the TOML table [calendars.EXCHANGE]; one-line ConfigError if wrong."""
    at = f"{where}: [calendars.{_toml_key(exchange)}]"
    if not isinstance(table, Mapping):
        raise ConfigError(
            f"{at}: must be a table with keys {', '.join(_CALENDAR_KEYS)}, got {_show(table)}"
        )
    for key in table:
        if key not in _CALENDAR_KEYS:
            raise ConfigError(
                f"{at}: unknown key {_toml_key(key)} (known keys: {', '.join(_CALENDAR_KEYS)})"
            )
    timezone = _text(at, table, "timezone") if "timezone" in table else _DEFAULT_TIMEZONE
    session = _session(at, _text(at, table, "session")) if "session" in table else _DEFAULT_SESSION
    holidays = frozenset(_dates(at, table, "holidays") if "holidays" in table else ())
    weekdays = _weekdays(at, table["weekdays"]) if "weekdays" in table else _DEFAULT_WEEKDAYS
    try:
        return Calendar(exchange, timezone, session, holidays, weekdays)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None


def parse_contract(
    at: str, table: Mapping[str, object], calendar: Calendar | None, *, exchange: str
) -> ContractRule:
    """The contract rule of an instrument's table (its keys underlying, expiry or
    expiries, roll_days_before); `at` prefixes every one-line ConfigError."""
    if "underlying" not in table:
        raise ConfigError(f"{at}: underlying is required (the futures' base symbol, e.g. NIFTY)")
    underlying = _text(at, table, "underlying")
    expiry = _text(at, table, "expiry") if "expiry" in table else None
    expiries = tuple(_dates(at, table, "expiries")) if "expiries" in table else ()
    if "expiries" in table and not expiries:
        raise ConfigError(f"{at}: expiries is empty: list the contracts' expiry dates")
    roll_days_before = table.get("roll_days_before", 0)
    # bool is an int to Python, never to an operator: `roll_days_before = true` is a mistake.
    if not isinstance(roll_days_before, int) or isinstance(roll_days_before, bool):
        raise ConfigError(
            f"{at}: roll_days_before must be a whole number of trading days,"
            f" got {_show(roll_days_before)}"
        )
    try:
        rule = ContractRule(underlying, expiry, expiries, roll_days_before)
    except ConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from None
    if calendar is None:
        raise ConfigError(
            f"{at}: a futures contract needs its exchange's calendar:"
            f" add a [calendars.{_toml_key(exchange)}] table"
        )
    return rule


def _last_weekdays(start: date, weekday: int) -> Iterator[date]:
    """The last `weekday` of each month from start's month on, without end."""
    year, month = start.year, start.month
    while True:
        last = date(year, month, monthrange(year, month)[1])
        yield last - timedelta(days=(last.weekday() - weekday) % 7)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


def _text(at: str, table: Mapping[str, object], key: str) -> str:
    value = table[key]
    if not isinstance(value, str):
        raise ConfigError(f"{at}: {key} must be a string, got {_show(value)}")
    return value


def _session(at: str, text: str) -> tuple[time, time]:
    found = _SESSION.fullmatch(text)
    try:
        if found:
            h1, m1, h2, m2 = (int(part) for part in found.groups())
            return time(h1, m1), time(h2, m2)
    except ValueError:  # e.g. 24:00
        pass
    raise ConfigError(
        f'{at}: session must be "HH:MM-HH:MM" such as "09:15-15:30", got {_show(text)}'
    )


def _weekdays(at: str, value: object) -> frozenset[int]:
    if not isinstance(value, list):
        raise ConfigError(
            f'{at}: weekdays must be a list such as ["Mon", "Tue"], got {_show(value)}'
        )
    for index, item in enumerate(value):
        if item not in _DAYS:
            raise ConfigError(
                f"{at}: weekdays[{index}] must be one of {' '.join(_DAYS)}, got {_show(item)}"
            )
    return frozenset(_DAYS.index(item) for item in value)


def _dates(at: str, table: Mapping[str, object], key: str) -> list[date]:
    """The list of dates at `key`: TOML dates or "YYYY-MM-DD" strings."""
    value = table[key]
    if not isinstance(value, list):
        raise ConfigError(
            f"{at}: {key} must be a list of dates such as [2026-01-26], got {_show(value)}"
        )
    found = []
    for index, item in enumerate(value):
        day = _as_date(item)
        if day is None:
            raise ConfigError(
                f"{at}: {key}[{index}] must be a date such as 2026-01-26, got {_show(item)}"
            )
        found.append(day)
    return found


def _as_date(value: object) -> date | None:
    # A TOML date-time is a datetime, itself a date to Python: refused, not truncated.
    if isinstance(value, datetime):
        return None
    if isinstance(value, date):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:  # e.g. 2026-02-30
            return None
    return None


def _toml_key(key: str) -> str:
    # JSON's quoted string with escapes is a valid TOML basic string, and one line.
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _show(value: object) -> str:
    """A value for a one-line message: as the file wrote it where it can; long ones cut."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date | time):
        return value.isoformat()
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
