"""The paper broker: stands in for the outside world, in the database itself.

Every order request it receives is a row of gateway.paper_broker_requests (a
duplicate would show there), and it fills every order it accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from service.brokers.base import OrderRequest, OrderResult
from service.errors import BrokerUnavailable
from service.queries import QUERIES

__all__ = ["PaperBroker"]


_PLACE = QUERIES["paper_place_orders"]
_LOOKUP = QUERIES["paper_lookup_order"]


class PaperBroker:
    """Fills every order at once and books each request it receives, duplicates included."""

    name = "paper"

    def __init__(self, pool: AsyncConnectionPool[Any], timeout: float = 2.0) -> None:
        self.pool = pool
        self.timeout = timeout

    async def place_many(
        self, orders: Sequence[OrderRequest]
    ) -> list[OrderResult | BrokerUnavailable]:
        columns = [
            [getattr(o, name) for o in orders]
            for name in ("client_order_id", "instrument", "action", "quantity", "price",
                         "epoch", "instance_id", "valid_until")
        ]  # fmt: skip
        try:
            async with self.pool.connection(timeout=self.timeout) as conn:
                cur = await conn.execute(_PLACE, columns)
                booked = dict(await cur.fetchall())
        except (psycopg.Error, TimeoutError) as exc:
            unknown = BrokerUnavailable(f"paper broker: {type(exc).__name__}: {exc}")
            return [unknown for _ in orders]
        return [
            OrderResult(f"paper-{booked[o.client_order_id]}", "filled")
            if o.client_order_id in booked
            else OrderResult(None, "rejected", "arrived after its validity")
            for o in orders
        ]

    async def lookup(self, client_order_id: str) -> OrderResult | None:
        try:
            async with self.pool.connection(timeout=self.timeout) as conn:
                cur = await conn.execute(_LOOKUP, [client_order_id])
                row = await cur.fetchone()
        except (psycopg.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"paper broker: {type(exc).__name__}: {exc}") from exc
        if row is None or row[0] is None:
            return None
        return OrderResult(f"paper-{row[0]}", "filled")
