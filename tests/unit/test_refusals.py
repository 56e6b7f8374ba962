"""The alerts of webhooks refused as invalid (service.intake.refusals): one per field
at once, then at most one a window, counting what came in between; never a secret."""

from __future__ import annotations

import json

import pytest

from service.errors import SignalError
from service.intake.refusals import KIND, Refusals, describe


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(**fields: object) -> bytes:
    return json.dumps({"secret": "s3cret-value", **fields}).encode()


async def flushed(refusals: Refusals) -> list[str]:
    sent: list[tuple[str, str]] = []

    async def send(kind: str, detail: str) -> None:
        sent.append((kind, detail))

    assert await refusals.flush(send) == len(sent)
    assert {kind for kind, _ in sent} <= {KIND}
    return [detail for _, detail in sent]


async def test_the_first_refusal_of_a_field_is_alerted_at_once_the_rest_once_a_window():
    clock = Clock()
    refusals = Refusals(every=60, clock=clock)
    lots = SignalError("lots must be a positive integer", "lots")
    refusals.record(lots, body(type="BASE_ENTRY", instrument="NIFTY", position="Long_1"))
    (first,) = await flushed(refusals)
    assert first.startswith("a webhook refused (400, not stored, TradingView does not retry)")
    assert first.endswith("(BASE_ENTRY NIFTY Long_1): lots must be a positive integer [field lots]")
    for _ in range(3):
        refusals.record(lots, body(position="Long_2"))
    clock.now += 30
    assert await flushed(refusals) == []  # within the window: counted, not sent
    # Another field has a window of its own.
    refusals.record(SignalError('side must be "long" or "short"', "side"), b"not json")
    (side,) = await flushed(refusals)
    assert side.endswith(': side must be "long" or "short" [field side]')
    clock.now += 30
    (later,) = await flushed(refusals)
    assert later.startswith("3 webhooks refused") and "(Long_2)" in later
    assert await flushed(refusals) == []
    assert refusals.total == 5


async def test_each_alert_names_the_distinct_signals_it_counts():
    clock = Clock()
    refusals = Refusals(every=60, clock=clock)
    error = SignalError("instrument NIFTYX is not traded here", "instrument")
    for n in range(7):
        refusals.record(error, body(type="BASE_ENTRY", instrument=f"X{n % 6}"))
    (detail,) = await flushed(refusals)
    assert detail.startswith("7 webhooks refused")
    assert "(BASE_ENTRY X0; BASE_ENTRY X1; BASE_ENTRY X2; BASE_ENTRY X3; BASE_ENTRY X4;" in detail
    assert " and others)" in detail, detail


async def test_a_refusal_recorded_while_its_alert_is_written_is_not_lost():
    clock = Clock()
    refusals = Refusals(every=60, clock=clock)
    lots = SignalError("lots must be a positive integer", "lots")
    refusals.record(lots, body(position="Long_1"))

    async def slow(kind: str, detail: str) -> None:  # another webhook arrives meanwhile
        refusals.record(lots, body(position="Long_2"))

    assert await refusals.flush(slow) == 1
    clock.now += 60
    (later,) = await flushed(refusals)
    assert later.startswith("a webhook refused") and "(Long_2)" in later, later


async def test_a_failed_send_keeps_the_alert_due():
    refusals = Refusals(clock=Clock())
    refusals.record(SignalError("body is empty"), b"")

    async def down(kind: str, detail: str) -> None:
        raise OSError("database unreachable")

    with pytest.raises(OSError):
        await refusals.flush(down)
    (detail,) = await flushed(refusals)
    assert detail.endswith(": body is empty [field body]")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (body(type="EXIT", instrument="NSE:NIFTY", position="Short_1"), "EXIT NSE:NIFTY Short_1"),
        (body(instrument="X" * 41, position="Long_1"), "Long_1"),  # too long to quote
        (body(instrument="A\nB"), None),  # not printable
        (body(instrument=5, type=["BASE_ENTRY"]), None),  # not text
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
        (b"[" * 100_000, None),
        (b"", None),
    ],
)
def test_describe_quotes_only_type_instrument_and_position(raw: bytes, expected: str | None):
    described = describe(raw)
    assert described == expected
    assert "s3cret" not in (described or "")
