"""The paper broker: stands in for the outside world, in the database itself.

Its book is gateway.paper_broker_requests: every order it placed, one row each
(a duplicate would show there). Like OpenAlgo's smart order it moves an
instrument to the target it is given, booking the difference from its own
position, and nothing when it is there already; it fills everything it places.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from service.brokers.base import Instrument, OrderAnswer, OrderRequest, OrderResult
from service.errors import BrokerUnavailable
from service.queries import QUERIES

__all__ = ["PaperBroker"]


_PLACE = QUERIES["paper_place_orders"]
_POSITIONS = QUERIES["paper_positions"]
_ORDERS_SINCE = QUERIES["paper_orders_since"]


class PaperBroker:
    """Fills every order it places at once; its book is a table."""

    name = "paper"
    order_rate = math.inf

    def __init__(self, pool: AsyncConnectionPool[Any], timeout: float = 2.0) -> None:
        self.pool = pool
        self.timeout = timeout

    async def place_many(self, orders: Sequence[OrderRequest]) -> list[OrderAnswer]:
        columns = [
            [o.client_order_id for o in orders],
            [_book_key(o.instrument) for o in orders],
            [o.target for o in orders],
            [o.price for o in orders],
            [o.epoch for o in orders],
            [o.instance_id for o in orders],
            [o.valid_until for o in orders],
        ]
        try:
            async with self._connection() as conn:
                cur = await conn.execute(_PLACE, columns)
                rows = await cur.fetchall()
        except BrokerUnavailable as exc:
            return [exc for _ in orders]
        booked = {coid: (booking, valid) for coid, booking, valid in rows}
        answers: list[OrderAnswer] = []
        for o in orders:
            booking, valid = booked[o.client_order_id]
            if not valid:
                answers.append(OrderResult(None, "rejected", "arrived after its validity"))
            elif booking is None:
                answers.append(OrderResult(None, "matched", "position already at the target"))
            else:
                answers.append(OrderResult(f"paper-{booking}", "filled"))
        return answers

    async def positions(self, instruments: Sequence[Instrument]) -> dict[str, int]:
        keys = [_book_key(i) for i in instruments]
        async with self._connection() as conn:
            cur = await conn.execute(_POSITIONS, [keys])
            held = dict(await cur.fetchall())
        return {i.name: int(held.get(key, 0)) for i, key in zip(instruments, keys, strict=True)}

    async def orders_since(self, instrument: Instrument, since: datetime) -> list[str]:
        async with self._connection() as conn:
            cur = await conn.execute(_ORDERS_SINCE, [_book_key(instrument), since])
            return [f"paper-{booking}" for (booking,) in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; any trouble with the database is the broker's silence."""
        try:
            async with self.pool.connection(timeout=self.timeout) as conn:
                yield conn
        except (psycopg.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"paper broker: {type(exc).__name__}: {exc}") from exc


def _book_key(instrument: Instrument) -> str:
    """The book's name of a position: the instrument's, or for a future with a
    contract rule its contract's symbol (each contract is a position of its own)."""
    return instrument.symbol if instrument.contract is not None else instrument.name
