"""Webhooks refused as invalid although their secret or signature was right.

TradingView never retries a 4xx: a typo in an alert's message, an instrument
missing from the instruments file, a host clock ahead of the exchange's each
lose a trade for good. An answer of 400 is all TradingView keeps (in its alert
log, which nobody reads while trading), so each such refusal also becomes an
alert (kind `signal_invalid`) that the leader delivers to the operator's phone.

Only authenticated requests come here: an unauthenticated one is answered 401
and counted, never alerted (anyone could send it). Per field at fault, the first
refusal is alerted at once and the next ones of the same field within `every`
seconds are counted into one alert after it, so a strategy firing a broken
template every second sends one message a minute. Alerts wait in memory until
the database takes them (the sweep hands them over, as the spool's alerts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service.errors import SignalError

__all__ = ["KIND", "Refusals", "describe"]

KIND = "signal_invalid"
_LABEL_MAX = 40  # characters of an instrument, type or position quoted in an alert


_SAMPLES = 5  # signals named in one alert; the rest are counted


@dataclass
class _Field:
    message: str  # the latest refusal's
    waiting: int = 0  # refusals not yet alerted
    signals: list[str] = field(default_factory=list)  # distinct, as far as each was read
    alerted_at: float | None = None


@dataclass
class Refusals:
    every: float = 60.0
    clock: Callable[[], float] = time.monotonic
    total: int = 0  # every refusal recorded (gateway_webhook_invalid_total)
    _fields: dict[str, _Field] = field(default_factory=dict)

    def record(self, error: SignalError, body: bytes) -> None:
        self.total += 1
        key = error.field or "body"
        entry = self._fields.setdefault(key, _Field(error.message))
        entry.message = error.message
        entry.waiting += 1
        what = describe(body)
        if what and what not in entry.signals and len(entry.signals) < _SAMPLES:
            entry.signals.append(what)

    def due(self) -> list[tuple[str, str, int]]:
        """(field, detail, refusals it counts) of every field that may be alerted now."""
        now = self.clock()
        found = []
        for key, entry in self._fields.items():
            quiet = entry.alerted_at is None or now - entry.alerted_at >= self.every
            if entry.waiting and quiet:
                found.append((key, _detail(key, entry), entry.waiting))
        return found

    async def flush(self, send: Callable[[str, str], Awaitable[object]]) -> int:
        """Hand each due alert to `send(kind, detail)`; one that raises stays due.
        Refusals recorded while `send` runs wait for the next alert of their field."""
        sent = 0
        for key, detail, counted in self.due():
            named = list(self._fields[key].signals)
            await send(KIND, detail)
            entry = self._fields[key]
            entry.waiting -= counted
            entry.signals = [s for s in entry.signals if s not in named]
            entry.alerted_at = self.clock()
            sent += 1
        return sent


def _detail(key: str, entry: _Field) -> str:
    count = "a webhook" if entry.waiting == 1 else f"{entry.waiting} webhooks"
    named = "; ".join(entry.signals)
    if len(entry.signals) == _SAMPLES and entry.waiting > _SAMPLES:
        named += "; and others"
    signals = f" ({named})" if named else ""
    return (
        f"{count} refused (400, not stored, TradingView does not retry){signals}:"
        f" {entry.message} [field {key}]"
    )


def describe(body: bytes) -> str | None:
    """The signal a refused body meant, as far as it can be read: its type, instrument
    and position when they are short printable strings; never any other field (the
    secret is one)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    words = []
    for name in ("type", "instrument", "position"):
        value = data.get(name)
        if isinstance(value, str) and value.isprintable() and 0 < len(value) <= _LABEL_MAX:
            words.append(value)
    return " ".join(words) or None
