"""What the executor needs of a broker, whichever it is.

Orders are **target net positions**: each order names the signed net quantity
an instrument must end at (lots x lot size, negative for short) and the one the
ledger holds before it. A broker moves the position to the target (OpenAlgo's
`placesmartorder` computes the difference itself), so sending the same target
twice cannot change the exposure. There is no idempotency key to rely on
(OpenAlgo has none): after an unknown outcome the executor asks the broker for
the position and for orders placed since the claim, never re-sends blindly.

Every answer to an order is one of:

    OrderResult           the broker decided: filled (it took the order),
                          matched (already at the target, nothing placed),
                          rejected (with the broker's message), or
                          awaiting_approval (queued for a human at the broker)
    BrokerRefused         nothing was placed, try again after `retry_after`
                          (rate limited, or not authorised: a bad key or an
                          expired broker session)
    BrokerUnavailable     the outcome is unknown (timeout, reset, 5xx)
    BrokerModeMismatch    the broker answered in another mode than configured
                          (analyze vs live): the order may or may not be real
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Literal, Protocol

from service.contracts import Calendar, ContractRule
from service.errors import BrokerModeMismatch, BrokerRefused, BrokerUnavailable

__all__ = [
    "Broker",
    "BrokerModeMismatch",
    "BrokerRefused",
    "BrokerUnavailable",
    "Instrument",
    "OrderAnswer",
    "OrderRequest",
    "OrderResult",
]


@dataclass(frozen=True, slots=True)
class Instrument:
    """Where a webhook `instrument` trades (a table of the instruments file)."""

    name: str  # the webhook's instrument
    exchange: str
    symbol: str  # with a contract rule: the underlying until a contract is chosen
    product: str = "NRML"
    lot_size: int = 1
    max_lots: int | None = None
    # Futures whose contract changes over time (service/contracts.py): the executor
    # and the rollover job pick the contract, `with_symbol` makes the instrument of it.
    contract: ContractRule | None = None
    calendar: Calendar | None = None

    def with_symbol(self, where: str | None) -> Instrument:
        """This instrument traded at `where` (exchange:symbol:product, as recorded on
        orders and positions); itself when `where` is None."""
        if where is None:
            return self
        symbol = where.split(":")[1] if where.count(":") == 2 else where
        return replace(self, symbol=symbol)


@dataclass(frozen=True, slots=True)
class OrderRequest:
    client_order_id: str  # ours, for our records: OpenAlgo has no field for it
    instrument: Instrument
    action: Literal["BUY", "SELL"]  # the side of target - start (gateway.order_action)
    start: int  # signed net quantity the ledger holds before this order
    target: int  # signed net quantity after it
    price: Decimal | None
    epoch: int
    instance_id: str
    valid_until: datetime  # never send it later: the next leader may act after that

    @property
    def quantity(self) -> int:
        return abs(self.target - self.start)

    @property
    def reduces(self) -> bool:
        """The order only brings the position closer to flat (an exit, a reduction)."""
        return abs(self.target) < abs(self.start) and self.target * self.start >= 0


@dataclass(frozen=True, slots=True)
class OrderResult:
    broker_order_id: str | None
    status: Literal["filled", "matched", "rejected", "awaiting_approval"]
    detail: str | None = None


OrderAnswer = OrderResult | BrokerRefused | BrokerUnavailable | BrokerModeMismatch


class Broker(Protocol):
    name: str
    order_rate: float  # orders per second it takes (math.inf: no limit)

    async def place_many(self, orders: Sequence[OrderRequest]) -> list[OrderAnswer]:
        """Send each order once; at most one order per instrument in `orders`. One
        answer per order, in order (see the module's docstring). Never raises for
        one order's trouble: that order's answer says it."""
        ...

    async def positions(self, instruments: Sequence[Instrument]) -> dict[str, int]:
        """The broker's signed net quantity of each instrument, by its name (0 when
        it holds none). Raises BrokerUnavailable or BrokerRefused."""
        ...

    async def orders_since(self, instrument: Instrument, since: datetime) -> list[str]:
        """The ids of the orders (any state) the broker has for this instrument placed
        at or after `since` ("" for one without an id). Raises BrokerUnavailable or
        BrokerRefused."""
        ...
