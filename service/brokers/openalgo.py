"""The OpenAlgo broker: each order is a target position sent to `placesmartorder`.

OpenAlgo (marketcalls/openalgo) moves a symbol/exchange/product position to the
`position_size` it is sent, so a replayed order cannot add exposure, with one
exception this adapter steers around: when the target and the broker's current
position are both 0 and `quantity` is not, OpenAlgo places a plain order of
`quantity` in `action` (broker/angel/api/order_api.py place_smartorder_api,
services/sandbox_service.py). Exits and reductions therefore send quantity "0":
a replayed exit finds the position flat and places nothing.

Answers, and what they become (see service.brokers.base):

    200 with an orderid                          confirmed in the order book, below
    a no-action message ("Positions Already      OrderResult(None, "matched", message)
      Matched", "No action needed", "No
      OpenPosition Found", "No action
      required"), on 200 or on 500: OpenAlgo's
      service returns the broker's no-action
      as HTTP 500 unless it says "No action
      needed" (services/place_smart_order_service.py)
    200 "mode": "semi_auto"                      OrderResult(None, "awaiting_approval", ...)
    other 4xx (validation: 400)                  OrderResult(None, "rejected", message)
    403 (bad key, expired broker session)        BrokerRefused(reason="unauthorised")
    429                                          BrokerRefused(reason="rate_limited")
    408, 5xx, timeout, reset, not JSON           BrokerUnavailable (outcome unknown)
    an answer in the other mode                  BrokerModeMismatch

Placed is not filled: a broker accepts an order (an orderid) before its risk checks
(margin, freeze quantity, price band) may reject it, and a market order may stay
open a moment. So an orderid is confirmed in the order book (the `orderbook`
endpoint, which OpenAlgo's own `orderstatus` reads whole anyway), looked at after
_CONFIRM_FIRST and then every _CONFIRM_EVERY: "complete" -> OrderResult(orderid,
"filled"); "rejected" -> OrderResult(orderid, "rejected", why): the signal fails with
an alert and the ledger does not move; "cancelled" (a part may have filled first) ->
the position book decides: at the start rejected, at the target filled, else unknown;
anything else (open,
trigger pending, a transient state, not in the book yet, the book unreadable) until
the order's validity or the adapter's timeout ends -> BrokerUnavailable: the outcome
is unknown and the executor settles it from the position book, as after a timeout.
Orders confirmed at the same time share one read of the book.

Mode: analyze (sandbox) answers carry `"mode": "analyze"`. A success answer must
match the configured mode both ways; an error answer is a mismatch only when it
says analyze to a live adapter (OpenAlgo's 403 and 429 never carry a mode).

Sends are paced across the instance (OpenAlgo limits smart orders per client with
flask-limiter, 10/s by default), 4% under `order_rate` so that jitter on the way
cannot squeeze 11 sends into the server's one-second window; a 429 holds every
later send back for its `retry_after`, at most _RATE_LIMIT_PAUSE (OpenAlgo always
says 60, app.py, for a one-second window), during which orders are refused here
without being sent; the executor puts them back in the queue. An order whose
validity ended while it waited for its turn is refused the same way, unsent.

The API key travels in the JSON body (never in the URL) and appears in no log,
no exception message and no repr.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import aiohttp
import structlog
from yarl import URL

from service.brokers.base import Instrument, OrderAnswer, OrderRequest, OrderResult
from service.errors import BrokerModeMismatch, BrokerRefused, BrokerUnavailable

__all__ = ["OpenAlgoBroker"]

log = structlog.get_logger("service.brokers.openalgo")

# Broker timestamps without a zone are Indian time (Kite's order_timestamp, and the
# sandbox's, are "YYYY-MM-DD HH:MM:SS" in IST); India has no daylight saving.
IST = timezone(timedelta(hours=5, minutes=30), "IST")

_NO_ACTION = ("positions already matched", "no action needed", "no openposition found")
_UNAUTHORISED_RETRY = 10.0  # seconds: a human has to log in again; asking is cheap
_DEFAULT_RETRY = 60.0  # what OpenAlgo's 429 handler always says (app.py)
_RATE_LIMIT_PAUSE = 2.0  # seconds: its limiter's window is one second
_HEADROOM = 1.04  # pace 4% under the configured rate
_PRODUCTS = {"MIS", "NRML", "CNC"}
_CONFIRM_FIRST = 0.1  # seconds from the orderid to the first look at the order book
_CONFIRM_EVERY = 0.5  # then between looks (the real book is the broker's API: rate-limited)
_CONFIRM_MARGIN = 0.1  # seconds before the order's validity ends: the executor's own bound
_FILLED = frozenset({"complete"})
_REJECTED = frozenset({"rejected"})  # by the broker's checks, before any fill
_CANCELLED = frozenset({"cancelled", "canceled"})  # possibly after a part filled
_TIMESTAMP_FORMATS = (  # beyond ISO 8601, as OpenAlgo's broker mappings pass them through
    "%d-%b-%Y %H:%M:%S",
    "%d-%m-%Y %H:%M:%S",
    "%d/%m/%Y %H:%M:%S",
    "%H:%M:%S %d-%m-%Y",
)


class _Secret:
    """A value whose repr never shows it (frames, vars(), debuggers)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "'***'"


class _Pacer:
    """Spaces sends evenly across one broker instance; holds them back after a 429."""

    def __init__(self, rate: float) -> None:
        self.interval = _HEADROOM / rate
        self._next = 0.0
        self._held_until = 0.0

    async def turn(self) -> float:
        """Wait for this send's turn. 0: send now; otherwise the seconds a 429 still holds."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._held_until > now:
            return self._held_until - now
        at = max(now, self._next)
        self._next = at + self.interval
        if at > now:
            await asyncio.sleep(at - now)
        return max(0.0, self._held_until - loop.time())

    def hold(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        self._held_until = max(self._held_until, until)


class OpenAlgoBroker:
    """Orders and reconciliation through one OpenAlgo server's REST API."""

    name = "openalgo"
    # orders_since counts orders stamped this much before `since` too: the broker's
    # clock (and its whole-second stamps) may run behind ours, and an order missed
    # there could be sent twice.
    clock_tolerance = timedelta(seconds=2)

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        strategy: str = "pgleader",
        mode: Literal["analyze", "live"] = "analyze",
        order_rate: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        if mode not in ("analyze", "live"):
            raise ValueError(f"openalgo: mode must be analyze or live, not {mode!r}")
        if not api_key:
            raise ValueError("openalgo: an API key is required")
        if order_rate <= 0 or timeout <= 0:
            raise ValueError("openalgo: order_rate and timeout must be positive")
        self.url = url.rstrip("/")
        self.strategy = strategy
        self.mode = mode
        self.order_rate = order_rate
        self.timeout = timeout
        self._api_key = _Secret(api_key)
        self._pacer = _Pacer(order_rate)
        self._session: aiohttp.ClientSession | None = None
        self._book_read: asyncio.Future[list[dict[str, Any]]] | None = None  # shared, in flight

    def __repr__(self) -> str:
        shown = URL(self.url).with_user(None)  # drop any credentials in the URL too
        return f"OpenAlgoBroker(url={str(shown)!r}, mode={self.mode!r}, api_key='***')"

    async def start(self) -> None:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- orders

    async def place_many(self, orders: Sequence[OrderRequest]) -> list[OrderAnswer]:
        """Send each order once, different instruments side by side (paced)."""
        await self.start()
        return list(await asyncio.gather(*(self._place(order) for order in orders)))

    async def _place(self, order: OrderRequest) -> OrderAnswer:
        answer: OrderAnswer
        try:
            answer = await self._send(order)
        except Exception as exc:  # a bug here must not take the other orders down
            answer = BrokerUnavailable(
                f"openalgo placesmartorder: unexpected {type(exc).__name__}; outcome unknown"
            )
        self._log_answer(order, answer)
        return answer

    async def _send(self, order: OrderRequest) -> OrderAnswer:
        held = await self._pacer.turn()
        if held > 0:
            return BrokerRefused(
                f"openalgo placesmartorder: not sent, rate limited for {held:.1f}s more",
                "rate_limited",
                held,
            )
        valid_until = order.valid_until
        if valid_until.tzinfo is None:
            valid_until = valid_until.replace(tzinfo=UTC)
        if datetime.now(UTC) > valid_until:
            # Not placed: the signal goes back to pending, and the next claim decides.
            return BrokerRefused(
                "openalgo placesmartorder: not sent, its validity ended while it waited",
                "expired",
                0.0,
            )
        instrument = order.instrument
        fields = {
            "strategy": self.strategy,
            "exchange": instrument.exchange,
            "symbol": instrument.symbol,
            "action": order.action,
            "product": instrument.product,
            "pricetype": "MARKET",
            # 0 for exits and reductions: see the module's docstring (both-zero quirk)
            "quantity": "0" if order.reduces else str(order.quantity),
            "position_size": str(order.target),
        }
        try:
            status, body, retry_header = await self._post("placesmartorder", fields)
        except BrokerUnavailable as exc:
            return exc
        answer = self._order_answer(status, body, retry_header)
        if isinstance(answer, OrderResult) and answer.status == "filled":
            return await self._confirm(order, answer, valid_until)
        return answer

    async def _confirm(
        self, order: OrderRequest, placed: OrderResult, valid_until: datetime
    ) -> OrderAnswer:
        """What the order book says became of an order the broker accepted (see the
        module's docstring)."""
        orderid = str(placed.broker_order_id)  # "filled" answers always carry one
        loop = asyncio.get_running_loop()
        began = loop.time()
        left = min((valid_until - datetime.now(UTC)).total_seconds(), self.timeout)
        deadline = began + max(0.0, left - _CONFIRM_MARGIN)
        seen = "not in the order book"
        pause = _CONFIRM_FIRST
        while True:
            await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
            pause = _CONFIRM_EVERY
            try:
                rows = await self._orders()
            except (BrokerUnavailable, BrokerRefused, BrokerModeMismatch) as exc:
                seen = f"the order book unreadable ({exc})"
                rows = []
            row = next((r for r in rows if str(r.get("orderid")) == orderid), None)
            if row is not None:
                state = str(row.get("order_status") or "").strip().lower()
                if state in _FILLED:
                    return placed
                if state in _REJECTED:
                    return OrderResult(
                        orderid, "rejected", f"order {orderid} accepted, then {state} by the"
                        " broker (its reason is in the broker's order book): nothing filled",
                    )  # fmt: skip
                if state in _CANCELLED:
                    return await self._cancelled(order, orderid)
                seen = f"still {state or 'without a status'}"
            if loop.time() >= deadline:
                return BrokerUnavailable(
                    f"openalgo: order {orderid} placed, {seen} after"
                    f" {loop.time() - began:.1f}s; outcome unknown"
                )

    def _order_answer(
        self, status: int, body: Mapping[str, Any], retry_header: str | None
    ) -> OrderAnswer:
        where = "openalgo placesmartorder"
        message = self._message(body)
        if status == 200 and body.get("mode") == "semi_auto":
            # Queued for a human whatever the server's mode; approval decides later.
            return OrderResult(
                None, "awaiting_approval", f"pending_order_id {body.get('pending_order_id')}"
            )
        if status == 403:
            return BrokerRefused(f"{where}: {message}", "unauthorised", _UNAUTHORISED_RETRY)
        if status == 429:
            # OpenAlgo's limiter counts per second, but its 429 always says 60 (app.py):
            # waiting a minute would let signals expire for a one-second window.
            retry = min(_retry_after(body, retry_header), _RATE_LIMIT_PAUSE)
            self._pacer.hold(retry)
            return BrokerRefused(f"{where}: {message}", "rate_limited", retry)
        mismatch = self._mode_mismatch("placesmartorder", status, body)
        if mismatch is not None:
            return mismatch
        if status in (200, 500) and _is_no_action(message):
            return OrderResult(None, "matched", message)
        if status == 200 and body.get("status") == "success" and body.get("orderid"):
            return OrderResult(str(body["orderid"]), "filled")
        if status == 408 or status >= 500:
            return BrokerUnavailable(f"{where}: HTTP {status}: {message}")
        if 400 <= status < 500:
            return OrderResult(None, "rejected", message)
        return BrokerUnavailable(f"{where}: HTTP {status} without an order id: {message}")

    def _log_answer(self, order: OrderRequest, answer: OrderAnswer) -> None:
        fields = {
            "client_order_id": order.client_order_id,
            "instrument": order.instrument.name,
            "action": order.action,
            "start": order.start,
            "target": order.target,
        }
        if isinstance(answer, OrderResult):
            log.info(
                "openalgo order answered",
                status=answer.status,
                broker_order_id=answer.broker_order_id,
                detail=answer.detail,
                **fields,
            )
        else:
            log.warning("openalgo order not answered", error=str(answer), **fields)

    # ---------------------------------------------------------------- reconciliation

    async def positions(self, instruments: Sequence[Instrument]) -> dict[str, int]:
        """Signed net quantity per instrument name, read from one positionbook call."""
        await self.start()
        status, body, retry_header = await self._post("positionbook", {})
        self._check_book("positionbook", status, body, retry_header)
        rows = body.get("data") or []
        if not isinstance(rows, list):
            raise BrokerUnavailable("openalgo positionbook: data is not a list")
        wanted = {(i.symbol, i.exchange, i.product) for i in instruments}
        held: dict[tuple[str, str, str], int] = {}
        for row in rows:
            if not isinstance(row, dict):
                raise BrokerUnavailable("openalgo positionbook: a row is not an object")
            key = (row.get("symbol"), row.get("exchange"), row.get("product"))
            if key not in wanted or key in held:
                continue  # the first row counts, as OpenAlgo's own smart order reads it
            try:
                held[key] = _whole_number(row.get("quantity"))
            except ValueError:
                raise BrokerUnavailable(
                    f"openalgo positionbook: quantity {row.get('quantity')!r} of {key[0]} "
                    "is not a whole number"
                ) from None
        return {i.name: held.get((i.symbol, i.exchange, i.product), 0) for i in instruments}

    async def orders_since(self, instrument: Instrument, since: datetime) -> list[str]:
        """The ids of the orders (any state) of this symbol/exchange/product stamped at
        or after `since`, less `clock_tolerance` ("" for an order without one). A naive `since` is taken as UTC. Broker stamps without a
        zone are Indian time; a stamp that cannot be read counts (conservative)."""
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        cutoff = since.replace(microsecond=0) - self.clock_tolerance  # stamps are whole seconds
        found: list[str] = []
        for row in await self._orders():
            if row.get("symbol") != instrument.symbol or row.get("exchange") != instrument.exchange:
                continue
            product = row.get("product")
            if product in _PRODUCTS and product != instrument.product:
                continue  # a product name we do not know could be ours: count it
            stamped = _parse_timestamp(row.get("timestamp"))
            if stamped is None or stamped >= cutoff:
                found.append(str(row.get("orderid") or ""))
        return found

    async def _cancelled(self, order: OrderRequest, orderid: str) -> OrderAnswer:
        """A cancelled order may have filled in part first (market protection, a price
        band), and the book's rows do not say how much: the position book does."""
        try:
            held = (await self.positions([order.instrument]))[order.instrument.name]
        except (BrokerUnavailable, BrokerRefused, BrokerModeMismatch) as exc:
            return BrokerUnavailable(
                f"openalgo: order {orderid} cancelled, the position book unreadable ({exc});"
                " outcome unknown"
            )
        if held == order.start:
            return OrderResult(
                orderid, "rejected", f"order {orderid} accepted, then cancelled by the broker"
                f" with nothing filled (the position is still {held})",
            )  # fmt: skip
        if held == order.target:
            return OrderResult(orderid, "filled")
        return BrokerUnavailable(
            f"openalgo: order {orderid} cancelled after part of it filled: the broker holds"
            f" {held}, the order went from {order.start} to {order.target}; outcome unknown"
        )

    async def _orders(self) -> list[dict[str, Any]]:
        """The order book's rows. Callers while a read is in flight share it (each
        confirmation of a burst would otherwise read the whole book)."""
        if self._book_read is None or self._book_read.done():
            self._book_read = asyncio.ensure_future(self._read_orders())
            # retrieved even when every caller was cancelled: no "never retrieved" warning
            self._book_read.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._book_read)

    async def _read_orders(self) -> list[dict[str, Any]]:
        await self.start()
        status, body, retry_header = await self._post("orderbook", {})
        self._check_book("orderbook", status, body, retry_header)
        data = body.get("data") or {}
        orders = data.get("orders") if isinstance(data, dict) else None
        if orders is None:
            return []
        if not isinstance(orders, list):
            raise BrokerUnavailable("openalgo orderbook: data.orders is not a list")
        if not all(isinstance(row, dict) for row in orders):
            raise BrokerUnavailable("openalgo orderbook: an order is not an object")
        return orders

    def _check_book(
        self, endpoint: str, status: int, body: Mapping[str, Any], retry_header: str | None
    ) -> None:
        """Raise what a failed book call means; return quietly on a success in our mode."""
        where = f"openalgo {endpoint}"
        if status == 403:
            raise BrokerRefused(
                f"{where}: {self._message(body)}", "unauthorised", _UNAUTHORISED_RETRY
            )
        if status == 429:  # as for orders: a one-second window, whatever it says
            retry = min(_retry_after(body, retry_header), _RATE_LIMIT_PAUSE)
            self._pacer.hold(retry)
            raise BrokerRefused(f"{where}: {self._message(body)}", "rate_limited", retry)
        mismatch = self._mode_mismatch(endpoint, status, body)
        if mismatch is not None:
            raise mismatch
        if status != 200 or body.get("status") != "success":
            raise BrokerUnavailable(f"{where}: HTTP {status}: {self._message(body)}")

    # ---------------------------------------------------------------- HTTP

    async def _post(
        self, endpoint: str, fields: Mapping[str, str]
    ) -> tuple[int, Mapping[str, Any], str | None]:
        """POST /api/v1/<endpoint>: (status, JSON object, Retry-After header), or
        BrokerUnavailable when no readable answer came back."""
        await self.start()
        assert self._session is not None
        where = f"openalgo {endpoint}"
        try:
            # aiohttp never retries a POST on a dropped connection (not idempotent).
            async with self._session.post(
                f"{self.url}/api/v1/{endpoint}",
                data=self._body(fields),
                headers={"Content-Type": "application/json"},
            ) as response:
                status = response.status
                raw = await response.read()
                retry_header = response.headers.get("Retry-After")
        except TimeoutError:
            raise BrokerUnavailable(f"{where}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            detail = self._scrub(str(exc)) or "connection failed"
            raise BrokerUnavailable(f"{where}: {type(exc).__name__}: {detail}") from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BrokerUnavailable(f"{where}: HTTP {status} with a body that is not a JSON object")
        return status, body, retry_header

    def _body(self, fields: Mapping[str, str]) -> bytes:
        return json.dumps({"apikey": self._api_key.value, **fields}).encode()

    def _mode_mismatch(
        self, endpoint: str, status: int, body: Mapping[str, Any]
    ) -> BrokerModeMismatch | None:
        answered = body.get("mode")
        if self.mode == "live" and answered == "analyze":
            return BrokerModeMismatch(
                f"openalgo {endpoint}: the server answered in analyze (sandbox) mode, "
                "this gateway is configured live: nothing real was done"
            )
        if self.mode == "analyze" and status == 200 and answered != "analyze":
            return BrokerModeMismatch(
                f"openalgo {endpoint}: the server answered in live mode, this gateway is "
                "configured analyze: an order may be real"
            )
        return None

    def _message(self, body: Mapping[str, Any]) -> str:
        message = body.get("message")
        if message is None:
            text = f"status {body.get('status', 'missing')}, no message"
        elif isinstance(message, str):
            text = message
        else:  # validation errors of the book endpoints come as an object
            text = json.dumps(message, sort_keys=True, default=str)
        return self._scrub(text)[:500]

    def _scrub(self, text: str) -> str:
        secret = self._api_key.value
        return text.replace(secret, "***") if secret else text


def _is_no_action(message: str) -> bool:
    lowered = message.lower()
    if any(phrase in lowered for phrase in _NO_ACTION):
        return True
    # Zerodha's no-action; its default "No action required or invalid parameters" is
    # a refusal of missing parameters instead (broker/zerodha/api/order_api.py).
    return "no action required" in lowered and "invalid parameters" not in lowered


def _retry_after(body: Mapping[str, Any], header: str | None) -> float:
    for value in (body.get("retry_after"), header):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds == seconds:  # not NaN
            return min(max(seconds, 0.0), 3600.0)
    return _DEFAULT_RETRY


def _whole_number(value: Any) -> int:
    """OpenAlgo's quantities: ints, floats or strings ("-10", "5.0"), integral."""
    if isinstance(value, bool) or value is None:
        raise ValueError(value)
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(value) from None
    if not number.is_finite() or number != number.to_integral_value():
        raise ValueError(value)
    return int(number)


def _parse_timestamp(value: Any) -> datetime | None:
    """An order's stamp as an aware datetime (no zone: Indian time), or None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if value > 1e11 else value  # epoch, in s or ms
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    parsed: datetime | None = None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        for layout in _TIMESTAMP_FORMATS:
            try:
                parsed = datetime.strptime(text, layout)
                break
            except ValueError:
                continue
    if parsed is None:
        return None
    return parsed.replace(tzinfo=IST) if parsed.tzinfo is None else parsed
