"""What the executor needs of a broker, whichever it is.

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
from typing import Literal, Protocol

from service.errors import BrokerUnavailable

__all__ = ["Broker", "BrokerUnavailable", "OrderRequest", "OrderResult"]


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
