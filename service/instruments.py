"""The instruments file: where each webhook `instrument` trades.

`PGLEADER_INSTRUMENTS_FILE` names a TOML file with one table per instrument:

    [instruments.NIFTY_FUT]
    exchange = "NFO"                 # NSE NFO CDS BSE BFO BCD MCX NCDEX NCO
    symbol = "NIFTY29DEC26FUT"       # OpenAlgo's symbol format
    product = "NRML"                 # NRML (default: carried futures), MIS or CNC
    lot_size = 75
    max_lots = 10                    # optional

A future whose contract changes over time names its contract rule instead of
`symbol` (`underlying`, `expiry` or `expiries`, `roll_days_before`), and its
exchange's calendar is a table `[calendars.NFO]` (service/contracts.py):

    [calendars.NFO]
    holidays = [2026-12-25]
    [instruments."NIFTY1!"]          # TradingView's continuous ticker
    exchange = "NFO"
    underlying = "NIFTY"
    expiry = "last-tuesday"
    roll_days_before = 2
    lot_size = 75

Table names are the webhook's instrument, case and all. Every problem is refused
with one line naming the file, the instrument and the key: a typo must stop the
gateway at start-up, never send an order to the wrong place.

`settings_fingerprint` digests trading settings (the instruments among them), so
instances can tell whether they trade by the same rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import re
import tomllib
from collections.abc import Mapping
from datetime import date, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from pgleader.errors import ConfigError, first_line
from service.brokers.base import Instrument
from service.contracts import Calendar, ContractRule, parse_calendar, parse_contract

__all__ = ["EXCHANGES", "PRODUCTS", "load_instruments", "settings_fingerprint"]

EXCHANGES: Final = ("NSE", "NFO", "CDS", "BSE", "BFO", "BCD", "MCX", "NCDEX", "NCO")
PRODUCTS: Final = ("NRML", "MIS", "CNC")
MAX_NAME_LENGTH: Final = 64

_KEYS: Final = ("exchange", "symbol", "product", "lot_size", "max_lots")
_CONTRACT_KEYS: Final = ("underlying", "expiry", "expiries", "roll_days_before")
_REQUIRED: Final = ("exchange", "lot_size")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
_WEBHOOK_NAME: Final = re.compile(r"[A-Za-z0-9_.:&!-]+")  # service.intake.signals' rule


def load_instruments(path: Path) -> dict[str, Instrument]:
    """Every instrument of the file at `path`, by name, in the file's order.
    Raises ConfigError (one line) for a missing, unreadable or invalid file."""
    where = f"instruments file {_show_path(path)}"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot be read: {exc.strerror or first_line(exc)}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: is not valid TOML: {first_line(exc)}") from None

    for key in document:
        if key not in ("instruments", "calendars"):
            raise ConfigError(
                f"{where}: unknown top-level key {_toml_key(key)}: "
                "each instrument is a table [instruments.NAME], each exchange's calendar"
                " [calendars.EXCHANGE]"
            )
    calendars = _calendars(where, document.get("calendars", {}))
    if "instruments" not in document:
        raise ConfigError(
            f"{where}: has no [instruments] table: add one [instruments.NAME] table "
            "per webhook instrument"
        )
    tables = document["instruments"]
    if not isinstance(tables, dict):
        raise ConfigError(
            f"{where}: instruments must be a table of [instruments.NAME] tables, "
            f"got {_show(tables)}"
        )
    if not tables:
        raise ConfigError(f"{where}: the [instruments] table is empty: add [instruments.NAME]")
    found: dict[str, Instrument] = {}
    traded: dict[tuple[str, str, str], str] = {}
    for name, table in tables.items():
        instrument = _instrument(where, name, table, calendars)
        # The webhook upper-cases an instrument (TradingView's tickers are upper case),
        # so the file's names are matched the same way.
        if instrument.name in found:
            raise ConfigError(
                f"{where}: {_table(name)}: the name {instrument.name} appears twice"
                " (names are matched without regard to case, as the webhook's)"
            )
        place = (instrument.exchange, instrument.symbol, instrument.product)
        if place in traded:
            raise ConfigError(
                f"{where}: {_table(name)}: trades {':'.join(place)} like"
                f" {_table(traded[place])}: two instruments would fight over one position"
            )
        found[instrument.name] = instrument
        traded[place] = name
    return found


def settings_fingerprint(**parts: object) -> str:
    """A short stable digest (16 hex chars of SHA-256) of trading settings.

    Values may be a mapping of Instruments, numbers, strings, timedelta, networks,
    sets, frozensets or tuples of those, or None. Mapping keys and set members are
    sorted, so neither the file's order nor a set's iteration order matters; a tuple
    keeps its order (pass a frozenset where order means nothing).
    """
    canonical = json.dumps(
        _canonical("", parts), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def _calendars(where: str, tables: object) -> dict[str, Calendar]:
    if not isinstance(tables, dict):
        raise ConfigError(
            f"{where}: calendars must be a table of [calendars.EXCHANGE] tables, got {_show(tables)}"
        )
    found = {}
    for exchange, table in tables.items():
        if exchange not in EXCHANGES:
            raise ConfigError(
                f"{where}: [calendars.{_toml_key(exchange)}]: the exchange must be one of"
                f" {' '.join(EXCHANGES)}"
            )
        found[exchange] = parse_calendar(where, exchange, table)
    return found


def _instrument(
    where: str, name: str, table: object, calendars: Mapping[str, Calendar]
) -> Instrument:
    if not name:
        raise ConfigError(f"{where}: {_table(name)}: the instrument name is empty")
    if not name.isprintable():
        raise ConfigError(
            f"{where}: {_table(name)}: the instrument name has a non-printable character"
        )
    if name != name.strip():
        raise ConfigError(
            f"{where}: {_table(name)}: the instrument name starts or ends with a space"
        )
    if not _WEBHOOK_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {_table(name)}: an instrument name may contain only letters A-Z,"
            " digits and _ . : & ! - (as a webhook's instrument)"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"{where}: {_table(name)}: the instrument name is longer than "
            f"{MAX_NAME_LENGTH} characters ({len(name)})"
        )
    at = f"{where}: {_table(name)}"
    if not isinstance(table, dict):
        raise ConfigError(
            f"{at}: must be a table with keys {', '.join(_REQUIRED)}, got {_show(table)}"
        )
    for key in table:
        if key not in _KEYS + _CONTRACT_KEYS:
            raise ConfigError(
                f"{at}: unknown key {_toml_key(key)} (known keys:"
                f" {', '.join(_KEYS + _CONTRACT_KEYS)})"
            )
    for key in _REQUIRED:
        if key not in table:
            raise ConfigError(f"{at}: {key} is required")
    if ("symbol" in table) == ("underlying" in table):
        raise ConfigError(
            f"{at}: give either symbol (the broker's trading symbol, e.g. NIFTY29DEC26FUT)"
            " or a futures contract rule (underlying with expiry or expiries), not "
            + ("both" if "symbol" in table else "neither")
        )
    exchange = _text(at, table, "exchange")
    if exchange not in EXCHANGES:
        raise ConfigError(
            f"{at}: exchange must be one of {' '.join(EXCHANGES)}, got {_show(exchange)}"
        )
    if "underlying" in table:
        calendar = calendars.get(exchange)
        rule = parse_contract(at, table, calendar, exchange=exchange)
        return Instrument(
            name=name.upper(),
            exchange=exchange,
            symbol=rule.underlying,
            product=_product(at, table),
            lot_size=_positive(at, table, "lot_size"),
            max_lots=_positive(at, table, "max_lots") if "max_lots" in table else None,
            contract=rule,
            calendar=calendar,
        )
    for key in _CONTRACT_KEYS:
        if key in table:
            raise ConfigError(
                f"{at}: {key} belongs to a contract rule: give underlying, not symbol"
            )
    symbol = _text(at, table, "symbol")
    if not symbol:
        raise ConfigError(f"{at}: symbol is empty")
    if not symbol.isprintable():
        raise ConfigError(f"{at}: symbol {_show(symbol)} has a non-printable character")
    if symbol != symbol.strip():
        raise ConfigError(f"{at}: symbol {_show(symbol)} starts or ends with a space")
    product = _product(at, table)
    lot_size = _positive(at, table, "lot_size")
    max_lots = _positive(at, table, "max_lots") if "max_lots" in table else None
    return Instrument(
        name=name.upper(),
        exchange=exchange,
        symbol=symbol,
        product=product,
        lot_size=lot_size,
        max_lots=max_lots,
    )


def _product(at: str, table: Mapping[str, object]) -> str:
    product = _text(at, table, "product") if "product" in table else "NRML"
    if product not in PRODUCTS:
        raise ConfigError(
            f"{at}: product must be one of {' '.join(PRODUCTS)}, got {_show(product)}"
        )
    return product


def _text(at: str, table: Mapping[str, object], key: str) -> str:
    value = table[key]
    if not isinstance(value, str):
        raise ConfigError(f"{at}: {key} must be a string, got {_show(value)}")
    return value


def _positive(at: str, table: Mapping[str, object], key: str) -> int:
    value = table[key]
    # bool is an int to Python, never to an operator: `lot_size = true` is a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{at}: {key} must be a whole number, got {_show(value)}")
    if value <= 0:
        raise ConfigError(f"{at}: {key} must be at least 1, got {value}")
    return value


def _canonical(where: str, value: object) -> Any:
    """`value` as JSON-ready data that reads the same in every process."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, timedelta):
        return {"microseconds": value // timedelta(microseconds=1)}
    if isinstance(
        value,
        ipaddress.IPv4Network
        | ipaddress.IPv6Network
        | ipaddress.IPv4Address
        | ipaddress.IPv6Address,
    ):
        return str(value)
    if isinstance(value, Instrument | ContractRule | Calendar):
        return {
            f.name: _canonical(where, getattr(value, f.name)) for f in dataclasses.fields(value)
        }
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"settings_fingerprint: {where or 'a'} key {key!r} is not a string")
            result[key] = _canonical(f"{where}.{key}" if where else key, item)
        return result
    if isinstance(value, set | frozenset):
        members = [_canonical(where, item) for item in value]
        return sorted(members, key=lambda m: json.dumps(m, sort_keys=True, ensure_ascii=True))
    if isinstance(value, tuple | list):
        return [_canonical(where, item) for item in value]
    raise TypeError(f"settings_fingerprint: {where or 'a part'} is a {type(value).__name__}")


def _table(name: str) -> str:
    """The table's header as it is written in the file: [instruments.NAME]."""
    return f"[instruments.{_toml_key(name)}]"


def _toml_key(key: str) -> str:
    # JSON's quoted string with escapes is a valid TOML basic string, and one line.
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _show(value: object) -> str:
    """A value for a one-line message: repr() escapes line breaks; long ones are cut."""
    if isinstance(value, bool):
        return "true" if value else "false"  # as the file wrote it, not Python's True
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _show_path(path: Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)
