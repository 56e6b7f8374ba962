"""service.intake.signals: what a webhook body must look like, and what the fingerprint ignores.

Pure parsing: no database, no network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.intake.signals import (
    Parsed,
    Side,
    Signal,
    SignalError,
    SignalType,
    fingerprint,
    fingerprint_raw,
    parse_body,
    parse_dict,
)

NOW = datetime(2026, 11, 23, 9, 20, tzinfo=UTC)
FIELDS = ["type", "instrument", "position", "lots", "price", "stop", "timestamp", "secret"]
PROPERTIES = settings(max_examples=200, deadline=None)


def entry(**changes: Any) -> dict[str, Any]:
    """A valid base entry; a change to None removes that key."""
    body: dict[str, Any] = {
        "type": "base_entry",
        "instrument": "NSE:NIFTY",
        "position": "Long_1",
        "lots": 2,
        "price": 24150.5,
        "timestamp": "2026-11-23T09:15:00Z",
        "secret": "s3cret",
    }
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


def parse(body: dict[str, Any], **kwargs: Any) -> Parsed:
    return parse_body(json.dumps(body).encode(), now=NOW, **kwargs)


def error_of(body: bytes | dict[str, Any], **kwargs: Any) -> SignalError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(SignalError) as caught:
        parse_body(raw, now=NOW, **kwargs)
    return caught.value


# --- what a good body becomes ------------------------------------------------------


def test_tradingview_body_becomes_a_normalised_signal_without_its_secret() -> None:
    parsed = parse(entry(instrument="  nse:nifty ", stop=24000, comment="{{strategy.order.id}}"))

    assert parsed.secret == "s3cret"
    assert parsed.signal == Signal(
        type=SignalType.BASE_ENTRY,
        instrument="NSE:NIFTY",
        position="Long_1",
        lots=2,
        price=Decimal("24150.5"),
        stop=Decimal("24000"),
        timestamp=datetime(2026, 11, 23, 9, 15, tzinfo=UTC),
        extra={"comment": "{{strategy.order.id}}"},
    )


def test_payload_is_json_with_exact_prices_and_a_utc_timestamp() -> None:
    signal = parse(entry(price=0.1, timestamp="2026-11-23T14:45:00.5+05:30", tags=[1.5])).signal

    payload = signal.payload()

    assert payload == {
        "type": "base_entry",
        "instrument": "NSE:NIFTY",
        "position": "Long_1",
        "side": "long",
        "lots": 2,
        "price": "0.1",
        "stop": None,
        "timestamp": "2026-11-23T09:15:00.500000Z",
        "extra": {"tags": [1.5]},
    }
    assert "s3cret" not in json.dumps(payload, allow_nan=False)


@pytest.mark.parametrize("spelling", ["base_entry", "BASE_ENTRY", " Base_Entry\n"])
def test_type_is_matched_case_insensitively(spelling: str) -> None:
    assert parse(entry(type=spelling)).signal.type is SignalType.BASE_ENTRY


def test_exit_may_omit_lots_and_price() -> None:
    signal = parse(entry(type="exit", lots=None, price=None)).signal

    assert (signal.type, signal.lots, signal.price) == (SignalType.EXIT, 0, None)


def test_exit_may_send_zero_lots() -> None:
    assert parse(entry(type="EXIT", lots=0)).signal.lots == 0


def test_pyramid_is_an_entry_that_needs_lots_and_price() -> None:
    assert parse(entry(type="pyramid")).signal.type is SignalType.PYRAMID
    assert error_of(entry(type="pyramid", lots=None)).field == "lots"
    assert error_of(entry(type="pyramid", price=None)).field == "price"


@pytest.mark.parametrize(
    ("written", "utc"),
    [
        ("2026-11-23T09:15:00Z", datetime(2026, 11, 23, 9, 15, tzinfo=UTC)),
        ("2026-11-23T14:45:00+05:30", datetime(2026, 11, 23, 9, 15, tzinfo=UTC)),
        ("2026-11-23T04:15:00-05:00", datetime(2026, 11, 23, 9, 15, tzinfo=UTC)),
        ("2026-11-23T09:15:00.123Z", datetime(2026, 11, 23, 9, 15, 0, 123000, tzinfo=UTC)),
        ("2026-11-23T09:15:00.000001Z", datetime(2026, 11, 23, 9, 15, 0, 1, tzinfo=UTC)),
    ],
)
def test_timestamp_is_converted_to_utc_keeping_fractions(written: str, utc: datetime) -> None:
    timestamp = parse(entry(timestamp=written)).signal.timestamp

    assert timestamp == utc
    assert timestamp.tzinfo is UTC


def test_timestamp_within_the_allowed_skew_is_accepted() -> None:
    assert parse(entry(timestamp="2026-11-23T09:20:05Z")).signal.timestamp.second == 5
    assert parse(entry(timestamp="2026-11-23T09:20:09Z"), max_future_skew=timedelta(seconds=10))


def test_old_timestamps_are_left_to_the_max_age_check() -> None:
    assert parse(entry(timestamp="2020-01-01T00:00:00Z")).signal.timestamp.year == 2020


def test_instrument_in_the_allow_list_is_accepted() -> None:
    allowed = frozenset({"NSE:NIFTY", "NSE:BANKNIFTY"})

    assert (
        parse(entry(instrument="nse:nifty"), instruments=allowed).signal.instrument == "NSE:NIFTY"
    )


def test_text_plain_body_with_a_byte_order_mark_is_accepted() -> None:
    raw = b"\xef\xbb\xbf" + json.dumps(entry()).encode()

    assert parse_body(raw, now=NOW).signal.instrument == "NSE:NIFTY"


def test_parse_dict_accepts_python_floats_and_tuples() -> None:
    signal = parse_dict(entry(price=0.1, levels=(1, 2.5)), now=NOW).signal

    assert signal.price == Decimal("0.1")
    assert signal.extra == {"levels": [1, 2.5]}


def test_a_key_named_extra_stays_inside_extra() -> None:
    payload = parse(entry(extra={"a": 1})).signal.payload()

    assert payload["extra"] == {"extra": {"a": 1}}


# --- what a bad body gets back ------------------------------------------------------

DEEP_LIST = b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "body is empty: the alert message must be a JSON object"),
        (b" \r\n\t", "body is empty: the alert message must be a JSON object"),
        (b'{"type": "\xff"}', "body is not UTF-8 text"),
        (b"BUY NIFTY", "body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        (
            b'{"type": "exit",}',
            "body is not valid JSON: "
            "Expecting property name enclosed in double quotes: line 1 column 17 (char 16)",
        ),
        (b"[1, 2]", "body must be a JSON object ({...}), not a list or a single value"),
        (b'"exit"', "body must be a JSON object ({...}), not a list or a single value"),
        (b'{"lots": 1, "lots": 2}', "duplicate key 'lots': each key may appear only once"),
        (b'{"a": {"b": 1, "b": 1}}', "duplicate key 'b': each key may appear only once"),
        (b'{"price": NaN}', "NaN is not allowed: numbers must be finite"),
        (b'{"price": Infinity}', "Infinity is not allowed: numbers must be finite"),
        (b'{"price": -Infinity}', "-Infinity is not allowed: numbers must be finite"),
        (
            b'{"lots": 1' + b"0" * 30 + b"}",
            "number '1000000000000000000000000000000' is out of range: "
            "at most 30 digits before and after the decimal point",
        ),
        (
            b'{"price": 1e400}',
            "number '1e400' is out of range: at most 30 digits before and after the decimal point",
        ),
        (
            b'{"price": 1e-31}',
            "number '1e-31' is out of range: at most 30 digits before and after the decimal point",
        ),
        (DEEP_LIST, "field 'a' is nested deeper than 8 levels"),
        (b"[" * 100_000, "body is nested deeper than 8 levels"),
        (b'{"a":' * 100_000, "body is nested deeper than 8 levels"),
        (
            json.dumps({f"k{i}": i for i in range(65)}).encode(),
            "a JSON object has more than 64 keys",
        ),
        (b'{"note": "a\\u0000b"}', "field 'note' holds a NUL character or an unpaired surrogate"),
        (b'{"note": "\\ud800"}', "field 'note' holds a NUL character or an unpaired surrogate"),
        (b'{"\\ud800": 1}', "key '\\ud800' holds a NUL character or an unpaired surrogate"),
    ],
)
def test_malformed_body_is_rejected_as_a_whole(raw: bytes, message: str) -> None:
    error = error_of(raw)

    # A problem inside one field names that (top-level) field; body-level ones name none.
    assert (error.field, error.message) == (_CULPRIT.get(raw), message)


_CULPRIT = {
    b'{"lots": 1, "lots": 2}': "lots",
    b'{"a": {"b": 1, "b": 1}}': "a",
    b'{"price": NaN}': "price",
    b'{"price": Infinity}': "price",
    b'{"price": -Infinity}': "price",
    b'{"lots": 1' + b"0" * 30 + b"}": "lots",
    b'{"price": 1e400}': "price",
    b'{"price": 1e-31}': "price",
    DEEP_LIST: "a",
    b'{"note": "a\\u0000b"}': "note",
    b'{"note": "\\ud800"}': "note",
}


def test_eight_levels_of_nesting_are_allowed() -> None:
    raw = json.dumps(entry()).encode()[:-1] + b', "a": ' + b"[" * 8 + b"]" * 8 + b"}"

    assert parse_body(raw, now=NOW).signal.extra == {"a": [[[[[[[[]]]]]]]]}


def test_thirty_digit_numbers_are_allowed() -> None:
    assert parse(entry(big=10**30 - 1)).signal.extra == {"big": 10**30 - 1}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"type": None}, "type", "missing field: type"),
        ({"instrument": None}, "instrument", "missing field: instrument"),
        ({"position": None}, "position", "missing field: position"),
        ({"lots": None}, "lots", "missing field: lots"),
        ({"price": None}, "price", "missing field: price"),
        ({"timestamp": None}, "timestamp", "missing field: timestamp"),
        ({"type": "buy"}, "type", "type must be one of: BASE_ENTRY, PYRAMID, EXIT"),
        ({"type": 1}, "type", "type must be one of: BASE_ENTRY, PYRAMID, EXIT"),
        ({"instrument": 5}, "instrument", "instrument must be a string such as NSE:NIFTY"),
        ({"instrument": "  "}, "instrument", "instrument must not be empty"),
        ({"instrument": "A" * 65}, "instrument", "instrument must be at most 64 characters"),
        (
            {"instrument": "NIFTY 50"},
            "instrument",
            "instrument may contain only letters A-Z, digits and _ . : & ! -",
        ),
        (
            {"instrument": "straße"},
            "instrument",
            "instrument may contain only letters A-Z, digits and _ . : & ! -",
        ),
        ({"position": ["Long_1"]}, "position", "position must be a string such as Long_1"),
        ({"position": ""}, "position", "position must not be empty"),
        ({"position": "L" * 65}, "position", "position must be at most 64 characters"),
        (
            {"position": "Long\n1"},
            "position",
            "position may contain only printable characters",
        ),
        ({"lots": 0}, "lots", "lots must be a positive integer"),
        ({"lots": -3}, "lots", "lots must be a positive integer"),
        ({"lots": 1.5}, "lots", "lots must be a positive integer"),
        ({"lots": 2.0}, "lots", "lots must be a positive integer"),
        ({"lots": True}, "lots", "lots must be a positive integer"),
        ({"lots": "5"}, "lots", "lots must be a positive integer, not a string: remove the quotes"),
        ({"lots": 10**6 + 1}, "lots", "lots must be at most 1000000"),
        ({"type": "exit", "lots": -1}, "lots", "lots must be zero or a positive integer"),
        ({"price": 0}, "price", "price must be a number greater than 0"),
        ({"price": -1.5}, "price", "price must be a number greater than 0"),
        ({"price": False}, "price", "price must be a number greater than 0"),
        ({"price": "24150.5"}, "price", "price must be a number, not a string: remove the quotes"),
        ({"stop": 0.0}, "stop", "stop must be a number greater than 0"),
        ({"stop": {"at": 1}}, "stop", "stop must be a number greater than 0"),
        ({"type": "exit", "price": -1}, "price", "price must be a number greater than 0"),
        ({"secret": 1234}, "secret", "secret must be a string"),
        (
            {"timestamp": 1763889300},
            "timestamp",
            "timestamp must be a string such as 2026-11-23T09:15:00Z",
        ),
        (
            {"timestamp": "{{timenow}}"},
            "timestamp",
            "timestamp must look like 2026-11-23T09:15:00Z or 2026-11-23T14:45:00+05:30",
        ),
        (
            {"timestamp": "2026-11-23 09:15:00Z"},
            "timestamp",
            "timestamp must look like 2026-11-23T09:15:00Z or 2026-11-23T14:45:00+05:30",
        ),
        (
            {"timestamp": "2026-11-23T09:15:00"},
            "timestamp",
            "timestamp must carry a timezone (Z or +HH:MM)",
        ),
        (
            {"timestamp": "2026-11-23T09:15:00.123"},
            "timestamp",
            "timestamp must carry a timezone (Z or +HH:MM)",
        ),
        (
            {"timestamp": "2026-02-30T09:15:00Z"},
            "timestamp",
            "timestamp is not a valid date and time: day is out of range for month",
        ),
        (
            {"timestamp": "2026-11-23T09:15:00+05:75"},
            "timestamp",
            "timestamp is not a valid date and time: offset minutes must be below 60, not 75",
        ),
        ({"timestamp": "2026-11-23T09:20:06Z"}, "timestamp", "timestamp is in the future"),
        ({"timestamp": "2026-11-23T14:50:06+05:30"}, "timestamp", "timestamp is in the future"),
    ],
)
def test_bad_field_is_named_with_an_actionable_message(
    changes: dict[str, Any], field: str, message: str
) -> None:
    error = error_of(entry(**changes))

    assert (error.field, error.message) == (field, message)
    assert error.to_dict() == {"status": "invalid", "error": message, "field": field}
    assert str(error) == message


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+05:00", "0000-01-01T00:00:00Z"])
def test_timestamp_outside_what_a_datetime_holds_is_a_field_error(timestamp: str) -> None:
    assert error_of(entry(timestamp=timestamp)).field == "timestamp"


def test_instrument_outside_the_allow_list_is_rejected() -> None:
    error = error_of(entry(instrument="nse:sensex"), instruments=frozenset({"NSE:NIFTY"}))

    assert (error.field, error.message) == (
        "instrument",
        "instrument NSE:SENSEX is not traded here (not in the allow-list or the instruments file)",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "field 'note' holds a value of type set, not JSON data"),
        (b"bytes", "field 'note' holds a value of type bytes, not JSON data"),
        (float("nan"), "field 'note' is NaN or infinite: numbers must be finite"),
        (Decimal("Infinity"), "field 'note' is NaN or infinite: numbers must be finite"),
        ({1: "a"}, "key 1 is not a string"),
        (
            10**30,
            "field 'note' is out of range: at most 30 digits before and after the decimal point",
        ),
    ],
)
def test_parse_dict_rejects_what_json_cannot_carry(value: Any, message: str) -> None:
    with pytest.raises(SignalError) as caught:
        parse_dict(entry(note=value), now=NOW)

    assert (caught.value.field, caught.value.message) == ("note", message)


def test_parse_dict_stops_at_a_self_referencing_structure() -> None:
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(SignalError, match="nested deeper than 8 levels"):
        parse_dict(entry(note=loop), now=NOW)


@pytest.mark.parametrize("data", [[], "body", None, 42])
def test_non_mapping_is_rejected_by_both_entry_points(data: Any) -> None:
    for call in (lambda: parse_dict(data, now=NOW), lambda: fingerprint_raw(data)):
        with pytest.raises(SignalError, match="body must be a JSON object"):
            call()


def test_naive_now_is_a_programming_error_not_a_bad_body() -> None:
    with pytest.raises(ValueError, match="now must be timezone-aware") as caught:
        parse_dict(entry(), now=datetime(2026, 11, 23, 9, 20))

    assert not isinstance(caught.value, SignalError)


# --- fingerprints -------------------------------------------------------------------


def test_fingerprint_is_sha256_of_instrument_type_position_and_second() -> None:
    signal = parse(entry(timestamp="2026-11-23T14:45:00.999+05:30")).signal
    expected = hashlib.sha256(b"NSE:NIFTY:base_entry:Long_1:2026-11-23T09:15:00Z").hexdigest()

    assert fingerprint(signal) == expected
    assert fingerprint_raw(entry(timestamp="2026-11-23T14:45:00.999+05:30")) == expected


def test_fingerprint_ignores_everything_but_its_four_fields() -> None:
    a = parse(entry(lots=1, price=1, secret="x", note="a")).signal
    b = parse(entry(lots=9, price=2, secret=None, stop=3)).signal

    assert fingerprint(a) == fingerprint(b)


def test_fingerprint_raw_names_the_unusable_field() -> None:
    with pytest.raises(SignalError) as caught:
        fingerprint_raw(entry(timestamp="2026-11-23T09:15:00"))

    assert caught.value.field == "timestamp"


def test_fingerprint_raw_does_not_validate_the_rest() -> None:
    body = entry(lots="lots", price=None, timestamp="2099-01-01T00:00:00Z")

    assert len(fingerprint_raw(body)) == 64


# --- properties -----------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
EXTRA_KEYS = TEXT.filter(lambda key: key not in FIELDS)
FINITE = st.floats(min_value=-1e15, max_value=1e15).filter(lambda f: f == 0 or abs(f) >= 1e-12)
SCALARS = st.none() | st.booleans() | st.integers(-(10**29), 10**29) | FINITE | TEXT


def json_data(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return SCALARS
    child = json_data(depth - 1)
    return SCALARS | st.lists(child, max_size=3) | st.dictionaries(TEXT, child, max_size=3)


OFFSETS = st.integers(-(23 * 60 + 59), 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2026, 11, 22),
    timezones=st.just(UTC) | OFFSETS,
)
SPELLINGS = st.sampled_from(["seconds", "milliseconds", "microseconds"])
NAME_CHARS = st.characters(categories=["L", "N", "P", "S"], codec="utf-8")
POSITIONS = st.text(NAME_CHARS, min_size=1, max_size=64)
INSTRUMENTS = st.from_regex(r"[A-Za-z0-9_.:&-]{1,64}", fullmatch=True)
PADDING = st.sampled_from(["", " ", "\t", "  \n"])


def write_time(moment: datetime, spelling: str, zulu: bool) -> str:
    text = moment.isoformat(timespec=spelling)
    return text.removesuffix("+00:00") + "Z" if zulu and text.endswith("+00:00") else text


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(SignalType)))
    body: dict[str, Any] = {
        "type": draw(st.sampled_from([kind.value, kind.value.upper(), kind.value.title()])),
        "instrument": draw(PADDING) + draw(INSTRUMENTS) + draw(PADDING),
        "position": draw(PADDING) + draw(POSITIONS) + draw(PADDING),
        "timestamp": write_time(draw(TIMES), draw(SPELLINGS), draw(st.booleans())),
    }
    if kind is not SignalType.EXIT or draw(st.booleans()):
        body["lots"] = draw(st.integers(0 if kind is SignalType.EXIT else 1, 10**6))
    if kind is not SignalType.EXIT or draw(st.booleans()):
        body["price"] = draw(st.integers(1, 10**9) | st.floats(min_value=1e-4, max_value=1e9))
    if draw(st.booleans()):
        body["stop"] = draw(st.floats(min_value=1e-4, max_value=1e9))
    if draw(st.booleans()):
        body["secret"] = draw(TEXT)
    body.update(draw(st.dictionaries(EXTRA_KEYS, json_data(3), max_size=5)))
    return body


def decimal_or_none(value: str | float | None) -> Decimal | None:
    """The exact value the JSON text stood for (repr is what json.dumps writes)."""
    return None if value is None else Decimal(value if isinstance(value, str) else repr(value))


def expected_extra(body: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key not in FIELDS}


@PROPERTIES
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_nothing_but_signal_error(raw: bytes) -> None:
    with contextlib.suppress(SignalError):
        parse_body(raw, now=NOW)


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), children, max_size=6)
    ),
    max_leaves=30,
)


@PROPERTIES
@given(
    ANY_JSON
    | st.builds(lambda b, k, v: {**b, k: v}, valid_bodies(), st.sampled_from(FIELDS), ANY_JSON)
)
def test_arbitrary_json_raises_nothing_but_signal_error(data: Any) -> None:
    with contextlib.suppress(SignalError):
        parse_body(json.dumps(data).encode(), now=NOW)
    with contextlib.suppress(SignalError):
        fingerprint_raw(data)


PYTHON_ODDITIES = st.recursive(
    st.none()
    | st.integers()
    | st.floats()
    | st.decimals()
    | st.text()
    | st.binary()
    | st.frozensets(st.integers(), max_size=2)
    | st.datetimes(),
    lambda children: (
        st.lists(children, max_size=3)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3)
    ),
    max_leaves=12,
)


@PROPERTIES
@given(
    st.builds(
        lambda b, k, v: {**b, k: v}, valid_bodies(), st.sampled_from(FIELDS) | TEXT, PYTHON_ODDITIES
    )
)
def test_arbitrary_python_values_raise_nothing_but_signal_error(data: dict[str, Any]) -> None:
    with contextlib.suppress(SignalError):
        parse_dict(data, now=NOW)
    with contextlib.suppress(SignalError):
        fingerprint_raw(data)


@PROPERTIES
@given(valid_bodies())
def test_valid_body_round_trips_into_the_payload(body: dict[str, Any]) -> None:
    parsed = parse_body(json.dumps(body).encode(), now=NOW)
    payload = json.loads(json.dumps(parsed.signal.payload(), allow_nan=False))

    assert parsed.secret == body.get("secret")
    assert payload["type"] == body["type"].lower()
    assert payload["instrument"] == body["instrument"].strip().upper()
    assert payload["position"] == body["position"].strip()
    assert payload["lots"] == body.get("lots", 0)
    assert decimal_or_none(payload["price"]) == decimal_or_none(body.get("price"))
    assert decimal_or_none(payload["stop"]) == decimal_or_none(body.get("stop"))
    assert datetime.fromisoformat(payload["timestamp"]) == datetime.fromisoformat(body["timestamp"])
    assert payload["extra"] == expected_extra(body)


@PROPERTIES
@given(valid_bodies())
def test_from_payload_is_the_inverse_of_payload(body: dict[str, Any]) -> None:
    signal = parse_dict(body, now=NOW).signal
    stored = json.loads(json.dumps(signal.payload(), allow_nan=False))

    assert Signal.from_payload(stored) == signal
    assert Signal.from_payload(stored).payload() == stored


def test_from_payload_reads_decimals_from_their_text_exactly() -> None:
    raw = b'{"type": "exit", "instrument": "X", "position": "L", "price": 52000.123456789012345678901234,'
    raw += b' "stop": 51499.99999999999999999999, "timestamp": "2026-11-23T09:15:00Z"}'
    payload = json.loads(json.dumps(parse_body(raw, now=NOW).signal.payload()))

    signal = Signal.from_payload(payload)

    assert str(signal.price) == "52000.123456789012345678901234"
    assert str(signal.stop) == "51499.99999999999999999999"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"price": 24150.5}, "price must be a number written as text"),
        ({"price": "NaN"}, "NaN or infinite"),
        ({"stop": "abc"}, "stop must be a number written as text"),
        ({"type": None}, "missing field: type"),
        ({"lots": "2"}, "lots must be a positive integer"),
        ({"timestamp": "yesterday"}, "timestamp must look like"),
        ({"secret": "s3cret"}, "unknown keys: secret"),
        ({"extra": {"price": "1"}}, "extra must be an object without signal fields"),
        ({"extra": []}, "extra must be an object without signal fields"),
    ],
)
def test_from_payload_refuses_a_damaged_payload(change: dict[str, Any], message: str) -> None:
    payload = parse(entry()).signal.payload()
    payload.update(change)
    payload = {key: value for key, value in payload.items() if value is not None}

    with pytest.raises(SignalError, match=message):
        Signal.from_payload(payload)


@PROPERTIES
@given(valid_bodies())
def test_fingerprint_of_the_parsed_signal_equals_the_raw_fingerprint(body: dict[str, Any]) -> None:
    assert fingerprint(parse_dict(body, now=NOW).signal) == fingerprint_raw(body)


@PROPERTIES
@given(valid_bodies(), st.integers(0, 999_999), st.integers(0, 999_999))
def test_fractions_of_a_second_do_not_change_the_fingerprint(
    body: dict[str, Any], first: int, second: int
) -> None:
    moment = datetime.fromisoformat(body["timestamp"])

    def at(micro: int) -> dict[str, Any]:
        return {**body, "timestamp": moment.replace(microsecond=micro).isoformat()}

    assert fingerprint_raw(at(first)) == fingerprint_raw(at(second))
    assert fingerprint(parse_dict(at(first), now=NOW).signal) == fingerprint_raw(at(second))


@PROPERTIES
@given(valid_bodies(), OFFSETS)
def test_the_same_instant_at_another_offset_has_the_same_fingerprint(
    body: dict[str, Any], offset: timezone
) -> None:
    moved = datetime.fromisoformat(body["timestamp"]).astimezone(offset)

    assert fingerprint_raw({**body, "timestamp": moved.isoformat()}) == fingerprint_raw(body)


@PROPERTIES
@given(valid_bodies(), PADDING, PADDING)
def test_instrument_case_and_whitespace_do_not_change_the_fingerprint(
    body: dict[str, Any], before: str, after: str
) -> None:
    respelled = before + body["instrument"].strip().swapcase() + after

    assert fingerprint_raw({**body, "instrument": respelled}) == fingerprint_raw(body)


def changed(body: dict[str, Any], part: str) -> dict[str, Any]:
    if part == "type":
        kind = SignalType(body["type"].lower())
        others = [other for other in SignalType if other is not kind]
        return {**body, "type": others[0].value}
    if part == "instrument":
        name = body["instrument"].strip().upper()
        return {**body, "instrument": name[:-1] + ("B" if name.endswith("A") else "A")}
    if part == "position":
        name = body["position"].strip()
        return {**body, "position": name[:-1] + ("b" if name.endswith("a") else "a")}
    moment = datetime.fromisoformat(body["timestamp"])
    return {**body, "timestamp": (moment - timedelta(seconds=1)).isoformat()}


@PROPERTIES
@given(valid_bodies(), st.sampled_from(["type", "instrument", "position", "second"]))
def test_any_change_of_the_four_fields_changes_the_fingerprint(
    body: dict[str, Any], part: str
) -> None:
    assert fingerprint_raw(changed(body, part)) != fingerprint_raw(body)


# --- the side: long or short, never guessed the wrong way ----------------------------


@pytest.mark.parametrize("kind", ["BASE_ENTRY", "PYRAMID", "EXIT"])
@pytest.mark.parametrize("label", ["Short_1", "short_2", "SHORT", "Shorts"])
def test_a_position_label_beginning_with_short_is_a_short(kind: str, label: str) -> None:
    assert parse(entry(type=kind, position=label)).signal.side is Side.SHORT


@pytest.mark.parametrize("kind", ["BASE_ENTRY", "PYRAMID", "EXIT"])
@pytest.mark.parametrize("label", ["Long_1", "Base", "P1", "ſhort"])
def test_any_other_label_is_a_long(kind: str, label: str) -> None:
    assert parse(entry(type=kind, position=label)).signal.side is Side.LONG


@pytest.mark.parametrize("kind", ["BASE_ENTRY", "PYRAMID", "EXIT"])
@pytest.mark.parametrize(
    ("value", "side"),
    [("short", Side.SHORT), (" SHORT ", Side.SHORT), ("long", Side.LONG), ("Long", Side.LONG)],
)
def test_an_explicit_side_decides_for_a_neutral_label(kind: str, value: str, side: Side) -> None:
    parsed = parse(entry(type=kind, position="Base", side=value))
    assert parsed.signal.side is side
    assert "side" not in parsed.signal.extra
    assert parsed.signal.payload()["side"] == side.value


@pytest.mark.parametrize(("label", "side"), [("Short_1", "long"), ("Long_1", "short")])
def test_a_side_contradicting_the_label_is_refused(label: str, side: str) -> None:
    error = error_of(entry(position=label, side=side))
    assert error.field == "side" and "contradicts" in error.message


@pytest.mark.parametrize("side", ["sell", "buy", 1, "", "ſhort", True])
def test_a_side_other_than_long_or_short_is_refused(side: Any) -> None:
    body = entry(position="Base")
    body["side"] = side
    error = error_of(body)
    assert error.field == "side", error.message


def test_a_short_and_a_long_of_one_label_are_two_signals() -> None:
    long, short = entry(position="Base", side="long"), entry(position="Base", side="short")
    assert fingerprint_raw(long) != fingerprint_raw(short)
    assert fingerprint(parse(short).signal) == fingerprint_raw(short)


def test_a_long_keeps_the_fingerprint_it_had_before_sides() -> None:
    body = entry(position="Long_1")
    second = parse(body).signal.timestamp.astimezone(UTC).replace(microsecond=0, tzinfo=None)
    text = f"{body['instrument'].upper()}:base_entry:Long_1:{second.isoformat()}Z"
    assert fingerprint_raw(body) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("side", ["long", "short"])
def test_the_side_survives_the_stored_payload(side: str) -> None:
    signal = parse(entry(position="Base", side=side)).signal
    assert Signal.from_payload(signal.payload()) == signal
