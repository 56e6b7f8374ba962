"""A Broker that counts and times every call of the one it wraps, for /metrics.

Calls by operation and outcome, each call's duration, and the orders' answers by
outcome; nothing else changes (the wrapped broker's answers and errors pass through).
Outcomes: `ok`; `refused` or `unauthorised` (BrokerRefused: the broker decided, the
latter means our key or session is bad); `unavailable` (no answer we can trust);
`mode_mismatch`; `cancelled` (the caller gave up: the executor's send budget).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TypeVar

from pgleader.metrics import Histogram
from service.brokers.base import Broker, Instrument, OrderAnswer, OrderRequest, OrderResult
from service.errors import BrokerModeMismatch, BrokerRefused, BrokerUnavailable

__all__ = ["MeteredBroker", "outcome_of"]

T = TypeVar("T")

# A broker call: a paper one is well under a millisecond, OpenAlgo's tens to hundreds.
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def outcome_of(answer: OrderAnswer | BaseException) -> str:
    if isinstance(answer, OrderResult):
        return "ok"
    if isinstance(answer, BrokerRefused):
        return "unauthorised" if answer.reason == "unauthorised" else "refused"
    if isinstance(answer, BrokerModeMismatch):
        return "mode_mismatch"
    if isinstance(answer, asyncio.CancelledError | TimeoutError):
        return "cancelled"
    return "unavailable"


class MeteredBroker:
    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.name = inner.name
        self.order_rate = inner.order_rate
        self.calls: Counter[tuple[str, str]] = Counter()  # (operation, outcome)
        self.orders: Counter[str] = Counter()  # each order's answer, by outcome
        self.seconds: dict[tuple[str, ...], Histogram] = {}  # (operation,)

    async def place_many(self, orders: Sequence[OrderRequest]) -> list[OrderAnswer]:
        answers = await self._timed("place_orders", self.inner.place_many(orders))
        for answer in answers:
            self.orders[outcome_of(answer)] += 1
        return answers

    async def positions(self, instruments: Sequence[Instrument]) -> dict[str, int]:
        return await self._timed("positions", self.inner.positions(instruments))

    async def orders_since(self, instrument: Instrument, since: datetime) -> list[str]:
        return await self._timed("orders_since", self.inner.orders_since(instrument, since))

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        began = time.perf_counter()
        outcome = "ok"
        try:
            return await call
        except (BrokerRefused, BrokerUnavailable, BrokerModeMismatch) as exc:
            outcome = outcome_of(exc)
            raise
        except (asyncio.CancelledError, TimeoutError):
            outcome = "cancelled"
            raise
        except Exception:
            outcome = "unavailable"
            raise
        finally:
            self.calls[operation, outcome] += 1
            hist = self.seconds.get((operation,))
            if hist is None:
                hist = self.seconds[(operation,)] = Histogram(_BUCKETS)
            hist.observe(time.perf_counter() - began)
