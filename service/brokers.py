"""The broker protocol, and the paper broker that stands in for the outside world.

A broker has no idempotency key we can rely on (OpenAlgo has none), so the
gateway never re-sends after an unknown outcome: it asks `lookup` instead.
Orders go out in batches (`place_many`): a broker with a basket call sends the
batch as one request; one without sends the orders side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["Broker", "BrokerUnavailable", "OrderRequest", "OrderResult", "PaperBroker"]


@dataclass(frozen=True, slots=True)
class OrderRequest:
    client_order_id: str
    instrument: str
    action: Literal["BUY", "SELL"]
    quantity: int
    price: Decimal | None
    epoch: int
    instance_id: str
    valid_until: datetime  # a request reaching the broker later is refused (order validity)


@dataclass(frozen=True, slots=True)
class OrderResult:
    broker_order_id: str | None
    status: Literal["filled", "rejected"]
    detail: str | None = None


class BrokerUnavailable(Exception):
    """The broker could not be asked or did not answer: the outcome is unknown."""


class Broker(Protocol):
    name: str

    async def place_many(
        self, orders: Sequence[OrderRequest]
    ) -> list[OrderResult | BrokerUnavailable]:
        """Send each order once (one basket where the broker has one). One answer per
        order, in order: a result, or BrokerUnavailable when its outcome is unknown."""
        ...

    async def lookup(self, client_order_id: str) -> OrderResult | None:
        """What became of an order: a result, None when the broker never received it.
        Raises BrokerUnavailable when the broker cannot tell."""
        ...


_PLACE = """
insert into gateway.paper_broker_requests
    (client_order_id, instrument, action, quantity, price, epoch, instance_id)
select o.client_order_id, o.instrument, o.action, o.quantity, o.price, o.epoch, o.instance_id
  from unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::numeric[], %s::bigint[],
              %s::text[], %s::timestamptz[])
       as o (client_order_id, instrument, action, quantity, price, epoch, instance_id, valid_until)
 where clock_timestamp() < o.valid_until
returning client_order_id, id
"""


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
                cur = await conn.execute(
                    "select min(id) from gateway.paper_broker_requests where client_order_id = %s",
                    [client_order_id],
                )
                row = await cur.fetchone()
        except (psycopg.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"paper broker: {type(exc).__name__}: {exc}") from exc
        if row is None or row[0] is None:
            return None
        return OrderResult(f"paper-{row[0]}", "filled")
