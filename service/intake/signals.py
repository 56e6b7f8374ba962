"""Webhook bodies in, validated signals out: parsing, normalising and fingerprinting.

A TradingView alert posts its message as the body; it cannot set headers, so the
secret travels in the body too. Everything here is pure (no I/O, no clock: the
caller passes `now`) and every problem with a body is a `SignalError` whose
message the alert's author can act on. Nothing else escapes, whatever the bytes.

The fingerprint (SHA-256 of instrument:type:position:timestamp to the second,
and ":short" for a short) is what the inbox de-duplicates on, so TradingView's
re-sends and a second alert firing in the same second collapse into one signal.

The side: `"side": "long" | "short"` when given; otherwise a position label
beginning with "Short" (any case) means short and anything else long. A side
that contradicts a label naming the other side ("Long_1" with side short) is
refused: one of the two is a mistake, and guessing could trade the opposite.
"""

from __future__ import annotations

import copy
import enum
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from service.errors import SignalError

__all__ = [
    "Parsed",
    "Side",
    "Signal",
    "SignalType",
    "fingerprint",
    "fingerprint_raw",
    "parse_body",
    "parse_dict",
]

_MAX_KEYS: Final = 64
_MAX_DEPTH: Final = 8  # container levels inside one field's value
_MAX_DIGITS: Final = 30  # before and after the decimal point, for any number
_MAX_NUMBER_TEXT: Final = 64  # checked before Decimal() sees the text
_MAX_LOTS: Final = 1_000_000  # well inside PostgreSQL integer, and any real order
_MAX_NAME: Final = 64
_DEFAULT_SKEW: Final = timedelta(seconds=5)

# TradingView tickers: "NSE:NIFTY", "BANKNIFTY1!" (continuous futures), "M&M".
_INSTRUMENT = re.compile(r"[A-Za-z0-9_.:&!-]+")
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?",
    re.ASCII | re.IGNORECASE,
)
_EXAMPLE_TIME: Final = "2026-11-23T09:15:00Z"


class SignalType(enum.StrEnum):
    # Lower-case values: an upper-cased instrument can then never contain one,
    # which keeps the fingerprint string unambiguous.
    BASE_ENTRY = "base_entry"
    PYRAMID = "pyramid"
    EXIT = "exit"


class Side(enum.StrEnum):
    LONG = "long"
    SHORT = "short"


_SIDES: Final = {side.value: side for side in Side}
_FIELDS: Final = frozenset(
    {"type", "instrument", "position", "side", "lots", "price", "stop", "timestamp"}
)
_PAYLOAD_KEYS: Final = _FIELDS | {"extra"}
_END_OF_TIME: Final = datetime.max.replace(tzinfo=UTC)
_TYPES: Final = {kind.value: kind for kind in SignalType}
_TYPE_NAMES: Final = ", ".join(kind.name for kind in SignalType)


@dataclass(frozen=True, slots=True)
class Signal:
    type: SignalType
    instrument: str
    position: str
    lots: int
    price: Decimal | None
    stop: Decimal | None
    timestamp: datetime
    extra: dict[str, Any]
    side: Side = Side.LONG

    def payload(self) -> dict[str, Any]:
        """The signal as stored: JSON-able, decimals as strings so no precision is lost."""
        return {
            "type": self.type.value,
            "instrument": self.instrument,
            "position": self.position,
            "side": self.side.value,
            "lots": self.lots,
            "price": _decimal_text(self.price),
            "stop": _decimal_text(self.stop),
            "timestamp": self.timestamp.astimezone(UTC).isoformat().removesuffix("+00:00") + "Z",
            "extra": copy.deepcopy(self.extra),
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Signal:
        """The inverse of `payload`: decimals from their text, exactly.

        Checked as a body is (it may come from a damaged file): anything else
        raises SignalError. The clock is not checked again: the signal was when
        it arrived.
        """
        payload = _mapping(data)
        unknown = set(payload) - _PAYLOAD_KEYS
        if unknown:
            raise SignalError(f"payload has unknown keys: {', '.join(sorted(map(str, unknown)))}")
        extra = payload.get("extra", {})
        if not isinstance(extra, Mapping) or not _FIELDS.isdisjoint(extra) or "secret" in extra:
            raise SignalError("payload extra must be an object without signal fields", "extra")
        body = dict(extra)
        for name in ("type", "instrument", "position", "lots", "timestamp"):
            body[name] = _required(payload, name)
        for name in ("price", "stop"):
            body[name] = _decimal_from_text(payload.get(name), name)
        if payload.get("side") is not None:  # absent in payloads stored before sides
            body["side"] = payload["side"]
        return parse_dict(body, now=_END_OF_TIME, max_future_skew=timedelta(0)).signal


@dataclass(frozen=True, slots=True)
class Parsed:
    signal: Signal
    secret: str | None


def parse_body(
    body: bytes,
    *,
    now: datetime,
    max_future_skew: timedelta = _DEFAULT_SKEW,
    instruments: frozenset[str] | None = None,
) -> Parsed:
    """Parse a raw webhook body. `instruments`, if given, holds upper-case names."""
    return parse_dict(
        _decode(body), now=now, max_future_skew=max_future_skew, instruments=instruments
    )


def parse_dict(
    data: Mapping[str, Any],
    *,
    now: datetime,
    max_future_skew: timedelta = _DEFAULT_SKEW,
    instruments: frozenset[str] | None = None,
) -> Parsed:
    """Validate an already decoded body (e.g. replayed from the spool).

    Fields are checked in a fixed order (secret, type, instrument, position, side,
    lots, price, stop, timestamp) and the first problem is the one reported. A null in
    an optional field (an exit's lots or price, stop) counts as absent, which is
    also how `Signal.payload` writes an absent price or stop.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    body = _clean_body(data)
    secret = _secret(body)
    kind = _signal_type(body)
    instrument = _instrument(body)
    if instruments is not None and instrument not in instruments:
        raise SignalError(
            f"instrument {instrument} is not traded here (not in the allow-list or the"
            " instruments file)",
            "instrument",
        )
    position = _position(body)
    signal = Signal(
        type=kind,
        instrument=instrument,
        position=position,
        side=_side(body, position),
        lots=_lots(body, kind),
        price=_positive_number(body, "price", required=kind is not SignalType.EXIT),
        stop=_positive_number(body, "stop", required=False),
        timestamp=_timestamp(body, latest=now + max_future_skew),
        extra={key: _json_data(value) for key, value in body.items() if key not in _FIELDS},
    )
    return Parsed(signal=signal, secret=secret)


def fingerprint(signal: Signal) -> str:
    return _digest(signal.instrument, signal.type, signal.position, signal.side, signal.timestamp)


def fingerprint_raw(data: Mapping[str, Any]) -> str:
    """The fingerprint straight from a raw body, without validating the rest of it."""
    body = _mapping(data)
    position = _position(body)
    return _digest(
        _instrument(body), _signal_type(body), position, _side(body, position),
        _utc_timestamp(body),
    )  # fmt: skip


def _digest(
    instrument: str, kind: SignalType, position: str, side: Side, timestamp: datetime
) -> str:
    # isoformat, not strftime: %Y does not zero-pad years below 1000 on every libc.
    second = timestamp.astimezone(UTC).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
    # A long's text is what it was before sides existed, so a signal spooled or
    # stored by an older version is still recognised as the same one.
    suffix = ":short" if side is Side.SHORT else ""
    text = f"{instrument}:{kind.value}:{position}:{second}{suffix}"
    return hashlib.sha256(text.encode()).hexdigest()


# --- decoding: bytes to plain JSON data ------------------------------------------


def _decode(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise SignalError("body is empty: the alert message must be a JSON object")
    try:
        text = body.decode("utf-8-sig")  # a leading BOM is harmless, so accept it
    except UnicodeDecodeError:
        raise SignalError("body is not UTF-8 text") from None
    try:
        data = json.loads(
            text,
            object_pairs_hook=_json_object,
            parse_constant=_json_constant,
            parse_int=_json_int,
            parse_float=_json_float,
        )
    except SignalError:  # a ValueError too: keep the hooks' own messages
        raise
    except RecursionError:
        raise SignalError(f"body is nested deeper than {_MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise SignalError(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SignalError("body must be a JSON object ({...}), not a list or a single value")
    return data


@dataclass(frozen=True, slots=True)
class _Refused:
    """A value the decoder refused. It stays in place until cleaning, which knows the
    field it belongs to and reports it there: the answer can then name the field."""

    message: str


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > _MAX_KEYS:
        raise SignalError(f"a JSON object has more than {_MAX_KEYS} keys")
    obj: dict[str, Any] = {}
    for key, value in pairs:
        # json.loads would silently keep the last one: refuse to guess which was meant.
        if key in obj:
            value = _Refused(f"duplicate key {_quote(key)}: each key may appear only once")
        obj[key] = value
    return obj


def _json_constant(name: str) -> Any:
    return _Refused(f"{name} is not allowed: numbers must be finite")


def _json_int(text: str) -> int | _Refused:
    # Checked before int() so a megabyte of digits cannot cost quadratic time.
    if len(text.lstrip("-")) > _MAX_DIGITS:
        return _Refused(_out_of_range(f"number {_quote(text)}").message)
    return int(text)


def _json_float(text: str) -> Decimal | _Refused:
    where = f"number {_quote(text)}"
    if len(text) > _MAX_NUMBER_TEXT:
        return _Refused(_out_of_range(where).message)
    try:
        return _checked_decimal(Decimal(text), where)
    except SignalError as exc:
        return _Refused(exc.message)


# --- cleaning: any mapping to plain JSON data with exact numbers ------------------


def _clean_body(data: object) -> dict[str, Any]:
    """A checked copy of the body: str keys, str/int/Decimal/bool/None/list/dict values.

    Runs on parse_body's output too, so that parse_dict (fed by other callers, e.g.
    the spool) enforces exactly the same limits.
    """
    body = _mapping(data)
    cleaned = {}
    for key, value in _items(body):
        try:
            cleaned[key] = _clean(value, f"field {_quote(key)}", 0)
        except SignalError as exc:
            raise SignalError(exc.message, key) from None  # name the field at fault
    return cleaned


def _mapping(data: object) -> Mapping[Any, Any]:
    # Typed callers always pass a mapping; untyped ones (tests, replays) may not.
    if not isinstance(data, Mapping):
        raise SignalError("body must be a JSON object")
    return data


def _items(data: Mapping[Any, Any]) -> list[tuple[str, Any]]:
    if len(data) > _MAX_KEYS:
        raise SignalError(f"a JSON object has more than {_MAX_KEYS} keys")
    for key in data:
        if not isinstance(key, str):
            raise SignalError(f"key {_quote(key)} is not a string")
        _checked_text(key, f"key {_quote(key)}")
    return list(data.items())


def _clean(value: Any, where: str, depth: int) -> Any:
    if isinstance(value, _Refused):
        raise SignalError(value.message)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= 10**_MAX_DIGITS:
            raise _out_of_range(where)
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SignalError(f"{where} is NaN or infinite: numbers must be finite")
        return _checked_decimal(Decimal(repr(value)), where)
    if isinstance(value, Decimal):
        return _checked_decimal(value, where)
    if isinstance(value, str):
        return _checked_text(value, where)
    if not isinstance(value, Mapping | list | tuple):
        raise SignalError(f"{where} holds a value of type {type(value).__name__}, not JSON data")
    # Also what stops a self-referencing structure handed to parse_dict.
    if depth >= _MAX_DEPTH:
        raise SignalError(f"{where} is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return {key: _clean(item, where, depth + 1) for key, item in _items(value)}
    return [_clean(item, where, depth + 1) for item in value]


def _checked_decimal(value: Decimal, where: str) -> Decimal:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):  # "n", "N" or "F": a NaN or an infinity
        raise SignalError(f"{where} is NaN or infinite: numbers must be finite")
    # Bounds keep format(), PostgreSQL numeric and float() sane for every number.
    if value.adjusted() >= _MAX_DIGITS or exponent < -_MAX_DIGITS:
        raise _out_of_range(where)
    return value


def _checked_text(text: str, where: str) -> str:
    # PostgreSQL text and jsonb refuse both; better a clear 400 now than a 500 later.
    if "\x00" in text or not _encodable(text):
        raise SignalError(f"{where} holds a NUL character or an unpaired surrogate")
    return text


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _out_of_range(where: str) -> SignalError:
    return SignalError(
        f"{where} is out of range: at most {_MAX_DIGITS} digits before and after the decimal point"
    )


def _json_data(value: Any) -> Any:
    """Cleaned data as stdlib-JSON-able data: extra keeps floats, as TradingView sent them."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {key: _json_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_data(item) for item in value]
    return value


# --- fields: shared by parse_dict and fingerprint_raw -----------------------------


def _required(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        raise SignalError(f"missing field: {name}", name)
    return data[name]


def _secret(body: dict[str, Any]) -> str | None:
    if "secret" not in body:
        return None
    secret = body.pop("secret")
    if not isinstance(secret, str):
        raise SignalError("secret must be a string", "secret")
    return secret


def _signal_type(data: Mapping[str, Any]) -> SignalType:
    value = _required(data, "type")
    kind = _TYPES.get(value.strip().lower()) if isinstance(value, str) else None
    if kind is not None:
        return kind
    raise SignalError(f"type must be one of: {_TYPE_NAMES}", "type")


def _instrument(data: Mapping[str, Any]) -> str:
    name = _name(data, "instrument", example="NSE:NIFTY")
    # Checked before upper(): "ß".upper() is "SS", which would sneak past the pattern.
    if not _INSTRUMENT.fullmatch(name):
        raise SignalError(
            "instrument may contain only letters A-Z, digits and _ . : & ! -", "instrument"
        )
    return name.upper()


def _position(data: Mapping[str, Any]) -> str:
    name = _name(data, "position", example="Long_1")
    if not name.isprintable():
        raise SignalError("position may contain only printable characters", "position")
    return name


def _side(data: Mapping[str, Any], position: str) -> Side:
    label = position.lower()
    named = (
        Side.SHORT if label.startswith("short") else Side.LONG if label.startswith("long") else None
    )
    value = data.get("side")
    if value is None:
        return named or Side.LONG
    side = _SIDES.get(value.strip().lower()) if isinstance(value, str) else None
    if side is None:
        raise SignalError('side must be "long" or "short"', "side")
    if named is not None and side is not named:
        raise SignalError(
            f"side {side.value} contradicts position {_quote(position)}, which names a"
            f" {named.value}: fix one of them",
            "side",
        )
    return side


def _name(data: Mapping[str, Any], field: str, *, example: str) -> str:
    value = _required(data, field)
    if not isinstance(value, str):
        raise SignalError(f"{field} must be a string such as {example}", field)
    name = value.strip()
    if not name:
        raise SignalError(f"{field} must not be empty", field)
    if len(name) > _MAX_NAME:
        raise SignalError(f"{field} must be at most {_MAX_NAME} characters", field)
    return name


def _lots(body: Mapping[str, Any], kind: SignalType) -> int:
    value = body.get("lots")
    minimum = 0 if kind is SignalType.EXIT else 1
    if value is None:
        if minimum == 0:
            return 0
        _required(body, "lots")
    wanted = "a positive integer" if minimum else "zero or a positive integer"
    if isinstance(value, str):
        raise SignalError(f"lots must be {wanted}, not a string: remove the quotes", "lots")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SignalError(f"lots must be {wanted}", "lots")
    if value > _MAX_LOTS:
        raise SignalError(f"lots must be at most {_MAX_LOTS}", "lots")
    return value


def _positive_number(body: Mapping[str, Any], field: str, *, required: bool) -> Decimal | None:
    value = body.get(field)
    if value is None:
        if not required:
            return None
        _required(body, field)
    if isinstance(value, str):
        raise SignalError(f"{field} must be a number, not a string: remove the quotes", field)
    if isinstance(value, bool) or not isinstance(value, int | Decimal) or value <= 0:
        raise SignalError(f"{field} must be a number greater than 0", field)
    return Decimal(value)


def _timestamp(body: Mapping[str, Any], *, latest: datetime) -> datetime:
    timestamp = _utc_timestamp(body)
    if timestamp > latest:
        raise SignalError("timestamp is in the future", "timestamp")
    return timestamp


def _utc_timestamp(data: Mapping[str, Any]) -> datetime:
    value = _required(data, "timestamp")
    if not isinstance(value, str):
        raise SignalError(f"timestamp must be a string such as {_EXAMPLE_TIME}", "timestamp")
    match = _TIMESTAMP.fullmatch(value.strip())
    if match is None:
        raise SignalError(
            f"timestamp must look like {_EXAMPLE_TIME} or 2026-11-23T14:45:00+05:30", "timestamp"
        )
    if match["offset"] is None:
        raise SignalError("timestamp must carry a timezone (Z or +HH:MM)", "timestamp")
    try:
        return _datetime(match).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise SignalError(f"timestamp is not a valid date and time: {exc}", "timestamp") from None


def _datetime(match: re.Match[str]) -> datetime:
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    return datetime(
        int(year),
        int(month),
        int(day),
        int(hour),
        int(minute),
        int(second),
        int((fraction or "").ljust(6, "0")),
        tzinfo=_zone(offset.upper()),
    )


def _zone(offset: str) -> timezone:
    if offset == "Z":
        return UTC
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if minutes >= 60:
        raise ValueError(f"offset minutes must be below 60, not {minutes}")
    sign = -1 if offset[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))  # >= 24 h raises


def _decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _decimal_from_text(text: object, field: str) -> Decimal | None:
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > _MAX_NUMBER_TEXT:
        raise SignalError(f"{field} must be a number written as text", field)
    try:
        return Decimal(text)
    except InvalidOperation:
        raise SignalError(f"{field} must be a number written as text", field) from None


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
