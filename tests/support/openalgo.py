"""A fake OpenAlgo over real HTTP: the broker the tests and the chaos campaign trade against.

OpenAlgo cannot run offline (every call needs a live broker session, market orders
need live quotes), so this module plays its REST API faithfully enough for the
adapter (`service.brokers.openalgo`) to meet every answer it can get in production.
In process: `fake = FakeOpenAlgo(api_key="k")`, `await fake.start()`, `fake.url`,
`fake.faults`, `fake.position(...)`, `await fake.close()`. As a process of its own:
`python -m tests.support.openalgo --port N --api-key K [--rate 10]` prints
`ready <url>` and is driven through `/_fake/state`, `/_fake/faults`, `/_fake/reset`.

What it reproduces, and where each behaviour was read (marketcalls/openalgo):
- Every endpoint is `POST /api/v1/<name>` with a JSON body carrying `apikey`; success
  is `{"status": "success", ...}`, failure `{"status": "error", "message": ...}`
  (restx_api/*.py).
- Validation is marshmallow's: messages per field ("Missing data for required
  field.", "Must be one of: ...", "Not a valid number.", "Unknown field." since the
  schemas keep marshmallow's default RAISE), a fractional quantity refused after
  loading (restx_api/schemas.py). Order endpoints send `str(err.messages)`, a Python
  dict's repr, as the message (restx_api/place_smart_order.py); the books send the
  dict itself (restx_api/positionbook.py, restx_api/orderbook.py).
- Answer order of placesmartorder: rate limit, validation (400), semi-auto queueing
  (checked before the broker session: services/place_smart_order_service.py,
  services/order_router_service.py), `403 Invalid openalgo apikey` (also when the key
  is right but the broker session expired), then the order.
- Smart order: the position is looked up by symbol, exchange AND product, first
  match; target == current answers without ordering; otherwise the difference is
  ordered; target 0 with current 0 and quantity != 0 places a plain order of
  `quantity` in `action` (broker/angel/api/order_api.py place_smartorder_api,
  services/sandbox_service.py sandbox_place_smart_order; note that
  broker/zerodha/api/order_api.py has no such branch).
- Live no-action answers: quantity != 0 gives 200 "Positions Already Matched. No
  Action needed."; quantity 0 gives the broker's "No OpenPosition Found. Not placing
  Exit order.", which the service does not recognise as a no-action and returns as
  HTTP 500 with status error (services/place_smart_order_service.py after
  broker/angel/api/order_api.py). With `broker="zerodha"` live mode follows
  broker/zerodha/api/order_api.py instead: no both-zero quirk, and every no-action
  is HTTP 500 "No action required" by the same path. A placed live smart order
  answers after SMART_ORDER_DELAY (0.5 s).
- Analyze (sandbox) mode: every answer of an order or book endpoint carries
  `"mode": "analyze"`, no-actions are 200 with either message, and the sandbox
  refuses NRML on NSE/BSE and CNC on derivatives (sandbox/order_manager.py
  _validate_order); the analyzer endpoint answers `data.mode` instead
  (services/analyzer_service.py).
- Semi-auto: 200 `{"status": "success", "message": "Order queued for approval in
  Action Center", "mode": "semi_auto", "pending_order_id": N}`, nothing placed
  (services/order_router_service.py).
- Rate limits per client and endpoint, flask-limiter style (a moving 1 s window):
  smart orders `--rate` (default 10/s as in .sample.env; the code's own fallback is
  "2 per second"), orders 10/s, other endpoints 50/s; the answer is app.py's 429
  handler, `{"status": "error", "message": "Rate limit exceeded. Please slow down
  your requests.", "retry_after": 60}`, 60 whatever the window.
- Books: positionbook rows {symbol, exchange, product, quantity, average_price, ltp,
  pnl}, closed rows kept with quantity "0", quantity a string as several brokers
  give it, average_price formatted "%.2f" (broker/zerodha/mapping/order_data.py
  transform_positions_data); orderbook `data.orders[]` + `data.statistics` with
  Zerodha's counters, price 0.0 for market orders, timestamp "YYYY-MM-DD HH:MM:SS"
  in Indian time without a zone (Kite's order_timestamp passed through by
  transform_order_data; the sandbox formats the same way, sandbox/order_manager.py);
  openposition `{"quantity": ..., "status": "success"}`
  (services/openposition_service.py).
- A request whose client went away is still carried out (Flask finishes it): the
  server never cancels a handler, and order work runs shielded.

- Placed is not filled: an order the broker accepted (an orderid) may then be
  rejected by its risk checks, or stay open before it fills; the books show it so
  (`order_status` "rejected", "open", "complete"), and the position moves only
  when it fills (faults `rms_reject`, `fill_after`); a broker may also cancel an
  order after part of it filled, which the books do not tell apart from a clean
  cancel (`cancel`, `cancel_filled`).

Not reproduced: margins and funds checks, lot sizes, the sandbox's separate book
(one book serves both modes here, so a harness reads one state), MIS square-off
hours, limit/stop orders (everything fills at once at the symbol's ltp), the
session-only filter of the sandbox orderbook.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

__all__ = ["IST", "FakeOpenAlgo", "Faults", "Order", "smart_order"]

# India has kept one offset, without daylight saving, since 1945.
IST = timezone(timedelta(hours=5, minutes=30), "IST")

# utils/constants.py VALID_EXCHANGES
EXCHANGES = [
    "NSE", "NFO", "CDS", "BSE", "BFO", "BCD", "MCX", "NCDEX", "NCO",
    "NSE_INDEX", "BSE_INDEX", "MCX_INDEX", "GLOBAL_INDEX", "CRYPTO",
]  # fmt: skip
DERIVATIVES = {"NFO", "BFO", "MCX", "CDS", "BCD", "NCDEX"}  # sandbox/order_manager.py
PRODUCTS = ["MIS", "NRML", "CNC"]
ACTIONS = ["BUY", "SELL", "buy", "sell"]
PRICE_TYPES = ["MARKET", "LIMIT", "SL", "SL-M"]

ALREADY_MATCHED = "Positions Already Matched. No Action needed."
NO_OPEN_POSITION = "No OpenPosition Found. Not placing Exit order."
NO_ACTION_REQUIRED = "No action required"  # Zerodha's
INVALID_KEY = "Invalid openalgo apikey"
RATE_LIMITED = "Rate limit exceeded. Please slow down your requests."
QUEUED = "Order queued for approval in Action Center"
SMART_ORDER_FAILED = "Failed to place smart order due to internal error"


# ---------------------------------------------------------------- faults


@dataclass
class Faults:
    """What the fake does wrong, and the server-wide modes. Settable per test
    (`fake.faults.latency = 2`) and over HTTP (`POST /_fake/faults`)."""

    latency: float = 0.0  # seconds an order call waits before it is applied
    error_status: int | None = None  # answer this (5xx) before applying
    drop_after_apply: bool = False  # apply, then close the connection unanswered
    calls: int | None = None  # the three above hit only the next N order calls
    symbol: str | None = None  # ... and only this symbol's
    books_too: bool = False  # latency and error_status also hit the non-order endpoints
    rate_limited: int = 0  # the next N API requests answer 429
    retry_after: int = 60  # app.py's 429 handler always says 60
    unauthorised: bool = False  # 403 until cleared (the broker session expired)
    analyze: bool = False  # analyze (sandbox) mode, server-wide
    semi_auto: bool = False  # orders are queued in the Action Center
    # The next N orders placed are accepted (an orderid, HTTP 200) and then rejected by
    # the broker's risk checks (margin, freeze quantity, price band): "rejected" in the
    # books, the position never moves.
    rms_reject: int = 0
    fill_after: float = 0.0  # a placed order stays "open" this long, then fills
    cancel: int = 0  # the next N orders placed are cancelled by the broker ...
    cancel_filled: float = 0.0  # ... after this part of each filled (market protection)

    def update(self, changes: dict[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        for name, value in changes.items():
            setattr(self, name, value)


# ---------------------------------------------------------------- state


@dataclass
class Order:
    orderid: str
    symbol: str
    exchange: str
    product: str
    action: str
    quantity: int
    price: float
    placed_at: datetime  # aware, Indian time
    timestamp: str  # as the orderbook shows it
    strategy: str = ""
    status: str = "complete"
    mode: str = "live"

    def row(self) -> dict[str, Any]:
        """An orderbook row, shaped as transform_order_data + format_order_data give it."""
        return {
            "symbol": self.symbol,
            "exchange": self.exchange,
            "action": self.action,
            "quantity": self.quantity,
            "price": 0.0,  # services/orderbook_service.py: 0.0 for market orders
            "trigger_price": 0.0,
            "pricetype": "MARKET",
            "product": self.product,
            "orderid": self.orderid,
            "order_status": self.status,
            "timestamp": self.timestamp,
        }


@dataclass
class Position:
    quantity: int = 0
    average_price: float = 0.0
    realized: float = 0.0


Key = tuple[str, str, str]  # symbol, exchange, product


def smart_order(
    current: int, target: int, quantity: int, action: str, broker: str = "angel"
) -> tuple[str, int] | str:
    """What placesmartorder does: (action, quantity) to place, or its no-action message.

    "angel" (and the sandbox) follows broker/angel/api/order_api.py and
    services/sandbox_service.py, quirk included; "zerodha" follows
    broker/zerodha/api/order_api.py, which has no both-zero branch and one message.
    """
    if broker == "zerodha":
        if target == current or (target == 0 and current == 0):
            return NO_ACTION_REQUIRED
        return ("BUY" if target > current else "SELL"), abs(target - current)
    if target == 0 and current == 0 and quantity != 0:
        return action.upper(), quantity  # the quirk: a plain order, target ignored
    if target == current:
        return NO_OPEN_POSITION if quantity == 0 else ALREADY_MATCHED
    if target == 0:
        return ("SELL" if current > 0 else "BUY"), abs(current)
    if current == 0:
        return ("BUY" if target > 0 else "SELL"), abs(target)
    return ("BUY" if target > current else "SELL"), abs(target - current)


class _MovingWindow:
    """flask-limiter's moving window: at most `limit` accepted hits in any `period`."""

    def __init__(self, limit: int, period: float = 1.0) -> None:
        self.limit = limit
        self.period = period
        self.hits: collections.deque[float] = collections.deque()

    def hit(self) -> bool:
        now = time.monotonic()
        while self.hits and self.hits[0] <= now - self.period:
            self.hits.popleft()
        if len(self.hits) >= self.limit:
            return False
        self.hits.append(now)
        return True


# ---------------------------------------------------------------- validation


class _Schema:
    """Just enough of marshmallow to give its messages for the fields OpenAlgo declares."""

    def __init__(self, **fields: dict[str, Any]) -> None:
        self.fields = fields

    def load(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[str]]]:
        data: dict[str, Any] = {}
        errors: dict[str, list[str]] = {}
        for name, spec in self.fields.items():
            if name not in body:
                if spec.get("required"):
                    errors[name] = ["Missing data for required field."]
                elif "missing" in spec:
                    data[name] = spec["missing"]
                continue
            value, problem = self._field(body[name], spec)
            if problem:
                errors[name] = [problem]
            else:
                data[name] = value
        for name in body:
            if name not in self.fields:
                errors[name] = ["Unknown field."]
        if not errors and "quantity" in data and data.get("exchange") != "CRYPTO":
            qty = data["quantity"]  # schemas.py _coerce_quantity_to_int, after loading
            if qty != int(qty):
                errors["quantity"] = [
                    f"Fractional quantity ({qty}) is not allowed for non-crypto exchanges."
                ]
            else:
                data["quantity"] = int(qty)
        return data, errors

    @staticmethod
    def _field(value: Any, spec: dict[str, Any]) -> tuple[Any, str | None]:
        kind = spec.get("kind", "str")
        if kind == "str":
            if not isinstance(value, str):
                return None, "Not a valid string."
            if "one_of" in spec and value not in spec["one_of"]:
                return None, f"Must be one of: {', '.join(spec['one_of'])}."
            if "length" in spec and not spec["length"][0] <= len(value) <= spec["length"][1]:
                return None, "Length must be between {} and {}.".format(*spec["length"])
            return value, None
        if kind == "bool":
            if isinstance(value, bool):
                return value, None
            return None, "Not a valid boolean."
        invalid = "Not a valid integer." if kind == "int" else "Not a valid number."
        if isinstance(value, bool):
            return None, invalid
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None, invalid
        if kind == "int" and number != int(number):
            return None, invalid
        if number != number or number in (float("inf"), float("-inf")):
            return None, "Special numeric values (nan or infinity) are not permitted."
        if "min" in spec and (number < spec["min"] or (number == spec["min"] and spec.get("open"))):
            return None, spec["range_error"]
        return number, None


_APIKEY = {"required": True, "length": (1, 256)}
_ORDER_COMMON: dict[str, dict[str, Any]] = {
    "apikey": _APIKEY,
    "strategy": {"required": True},
    "exchange": {"required": True, "one_of": EXCHANGES},
    "symbol": {"required": True},
    "action": {"required": True, "one_of": ACTIONS},
}
_ORDER_OPTIONAL: dict[str, dict[str, Any]] = {
    "pricetype": {"missing": "MARKET", "one_of": PRICE_TYPES},
    "product": {"missing": "MIS", "one_of": PRODUCTS},
    "price": {"kind": "float", "missing": 0.0, "min": 0, "range_error": "Price must be a non-negative number."},
    "trigger_price": {"kind": "float", "missing": 0.0, "min": 0, "range_error": "Trigger price must be a non-negative number."},
    "disclosed_quantity": {"kind": "int", "missing": 0, "min": 0, "range_error": "Disclosed quantity must be a non-negative integer."},
}  # fmt: skip
# restx_api/schemas.py SmartOrderSchema and OrderSchema
SMART_ORDER_SCHEMA = _Schema(
    **_ORDER_COMMON,
    quantity={"kind": "float", "required": True, "min": 0, "range_error": "Quantity must be a non-negative number."},
    position_size={"kind": "float", "required": True},
    **_ORDER_OPTIONAL,
)  # fmt: skip
ORDER_SCHEMA = _Schema(
    **_ORDER_COMMON,
    quantity={"kind": "float", "required": True, "min": 0, "open": True, "range_error": "Quantity must be a positive number."},
    **_ORDER_OPTIONAL,
)  # fmt: skip
KEY_ONLY_SCHEMA = _Schema(apikey=_APIKEY)
OPEN_POSITION_SCHEMA = _Schema(
    apikey=_APIKEY,
    strategy={"required": True},
    symbol={"required": True},
    exchange={"required": True, "one_of": EXCHANGES},
    product={"required": True, "one_of": PRODUCTS},
)
ORDER_STATUS_SCHEMA = _Schema(
    apikey=_APIKEY, strategy={"required": True}, orderid={"required": True}
)
TOGGLE_SCHEMA = _Schema(apikey=_APIKEY, mode={"kind": "bool", "required": True})


# ---------------------------------------------------------------- the server

Handler = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


class FakeOpenAlgo:
    """OpenAlgo's REST API over one book of positions and orders, with faults."""

    def __init__(
        self,
        api_key: str = "fake-openalgo-key",
        *,
        rate: int = 10,
        order_rate: int = 10,
        api_rate: int = 50,
        smart_order_delay: float = 0.5,
        broker: str = "angel",
        default_ltp: float = 100.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if broker not in ("angel", "zerodha"):
            raise ValueError(f"broker must be angel or zerodha, not {broker!r}")
        self.api_key = api_key
        self.broker = broker  # whose smart-order logic live mode follows
        self.rates = {"placesmartorder": rate, "placeorder": order_rate}
        self.api_rate = api_rate
        self.smart_order_delay = smart_order_delay  # SMART_ORDER_DELAY, live mode only
        self.default_ltp = default_ltp
        self.clock = clock or (lambda: datetime.now(IST))
        self.ltp: dict[str, float] = {}  # per symbol; market orders fill here
        self.faults = Faults()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self.reset()

    # -- state a test reads

    def reset(self) -> None:
        """Forget every position, order, queued order and fault; keep key, rates, clock."""
        self.book: dict[Key, Position] = {}
        self.max_abs: dict[str, int] = {}  # largest |net position| ever reached, per symbol
        self.orders: list[Order] = []
        self.pending: list[dict[str, Any]] = []  # semi-auto's Action Center
        self.answers: collections.Counter[int] = collections.Counter()  # HTTP status -> count
        self.faults = Faults()
        self._windows: dict[str, _MovingWindow] = {}
        self._ids = itertools.count(1)
        self._pending_ids = itertools.count(1)
        for later in getattr(self, "_later", []):
            later.cancel()
        self._later: list[asyncio.TimerHandle] = []  # orders open until they fill

    def position(self, symbol: str, exchange: str, product: str) -> int:
        held = self.book.get((symbol, exchange, product))
        return held.quantity if held else 0

    def state(self) -> dict[str, Any]:
        return {
            "positions": [
                {"symbol": s, "exchange": e, "product": p, "quantity": held.quantity}
                for (s, e, p), held in self.book.items()
            ],
            "max_abs_positions": dict(self.max_abs),
            "orders": [
                {k: v for k, v in dataclasses.asdict(o).items() if k != "placed_at"}
                for o in self.orders
            ],
            "pending_orders": list(self.pending),
            "answers": {str(status): n for status, n in sorted(self.answers.items())},
            "faults": dataclasses.asdict(self.faults),
        }

    # -- running

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v1/{name:[a-z/]+}", self._api)
        app.router.add_get("/_fake/state", self._state)
        app.router.add_post("/_fake/faults", self._set_faults)
        app.router.add_post("/_fake/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # handler_cancellation=False (aiohttp's default, said out loud): like Flask,
        # the fake finishes a request whose client has gone.
        self._runner = web.AppRunner(self.app(), handler_cancellation=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self.url = f"http://{bound_host}:{bound_port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- the API

    async def _api(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"].strip("/")
        handler = self._endpoints().get(name)
        if handler is None:
            return self._answer({"status": "error", "message": "Not found"}, 404)
        if self.faults.rate_limited > 0:
            self.faults.rate_limited -= 1
            return self._too_many()
        window = self._windows.setdefault(name, _MovingWindow(self.rates.get(name, self.api_rate)))
        if not window.hit():
            return self._too_many()
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            return self._answer({"status": "error", "message": "An unexpected error occurred"}, 500)
        # Order work is shielded: a request is carried out even if its client gave up.
        return await asyncio.shield(handler(request, body))

    def _endpoints(self) -> dict[str, Handler]:
        return {
            "placesmartorder": self._placesmartorder,
            "placeorder": self._placeorder,
            "positionbook": self._positionbook,
            "openposition": self._openposition,
            "orderbook": self._orderbook,
            "orderstatus": self._orderstatus,
            "funds": self._funds,
            "analyzer": self._analyzer,
            "analyzer/toggle": self._analyzer_toggle,
        }

    async def _placesmartorder(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        data, errors = SMART_ORDER_SCHEMA.load(body)
        if errors:
            return self._answer(self._moded({"status": "error", "message": str(errors)}), 400)
        return await self._order(request, data, "smartorder")

    async def _placeorder(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        data, errors = ORDER_SCHEMA.load(body)
        if errors:
            return self._answer(self._moded({"status": "error", "message": str(errors)}), 400)
        return await self._order(request, data, "placeorder")

    async def _order(
        self, request: web.Request, data: dict[str, Any], kind: str
    ) -> web.StreamResponse:
        if self.faults.semi_auto and data["apikey"] == self.api_key:
            queued = {k: v for k, v in data.items() if k != "apikey"}
            pending_id = next(self._pending_ids)
            self.pending.append({"pending_order_id": pending_id, "api_type": kind, **queued})
            return self._answer(
                {"status": "success", "message": QUEUED, "mode": "semi_auto", "pending_order_id": pending_id},
                200,
            )  # fmt: skip
        if data["apikey"] != self.api_key or self.faults.unauthorised:
            return self._answer({"status": "error", "message": INVALID_KEY}, 403)
        faulty = self._take_fault(data["symbol"])
        if faulty and self.faults.error_status:
            return self._answer(
                self._moded({"status": "error", "message": SMART_ORDER_FAILED}),
                self.faults.error_status,
            )
        if faulty and self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        analyze = self.faults.analyze
        symbol, exchange, product = data["symbol"], data["exchange"], data["product"]
        action, quantity = data["action"].upper(), int(data["quantity"])
        if kind == "smartorder":
            current = self.position(symbol, exchange, product)
            logic = "angel" if analyze else self.broker  # the sandbox's is Angel's
            decided = smart_order(current, int(data["position_size"]), quantity, action, logic)
            if isinstance(decided, str):
                if analyze or decided == ALREADY_MATCHED:
                    return self._answer(self._moded({"status": "success", "message": decided}), 200)
                await asyncio.sleep(self.smart_order_delay)
                return self._answer({"status": "error", "message": decided}, 500)
            action, quantity = decided
        if analyze:
            problem = self._sandbox_refusal(exchange, product)
            if problem:
                return self._answer({"status": "error", "message": problem, "mode": "analyze"}, 400)
        order = self._fill(symbol, exchange, product, action, quantity, data["strategy"])
        if faulty and self.faults.drop_after_apply and request.transport is not None:
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        if kind == "smartorder" and not analyze:
            await asyncio.sleep(self.smart_order_delay)
        return self._answer(self._moded({"status": "success", "orderid": order.orderid}), 200)

    async def _positionbook(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        refused = await self._book_gate(body, KEY_ONLY_SCHEMA)
        if refused:
            return refused
        rows = []
        for (symbol, exchange, product), held in self.book.items():
            ltp = self.ltp.get(symbol, self.default_ltp)
            unrealized = (ltp - held.average_price) * held.quantity if held.quantity else 0.0
            rows.append({
                "symbol": symbol,
                "exchange": exchange,
                "product": product,
                "quantity": str(held.quantity),
                "average_price": f"{held.average_price:.2f}",
                "ltp": round(ltp, 2),
                "pnl": round(held.realized + unrealized, 2),
            })  # fmt: skip
        return self._answer(self._moded({"status": "success", "data": rows}), 200)

    async def _openposition(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        refused = await self._book_gate(body, OPEN_POSITION_SCHEMA)
        if refused:
            return refused
        quantity = self.position(body["symbol"], body["exchange"], body["product"])
        return self._answer(self._moded({"quantity": str(quantity), "status": "success"}), 200)

    async def _orderbook(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        refused = await self._book_gate(body, KEY_ONLY_SCHEMA)
        if refused:
            return refused
        statistics = {
            "total_buy_orders": sum(o.action == "BUY" for o in self.orders),
            "total_sell_orders": sum(o.action == "SELL" for o in self.orders),
            "total_completed_orders": sum(o.status == "complete" for o in self.orders),
            "total_open_orders": sum(o.status == "open" for o in self.orders),
            "total_rejected_orders": sum(o.status == "rejected" for o in self.orders),
        }
        data = {"orders": [o.row() for o in self.orders], "statistics": statistics}
        return self._answer(self._moded({"status": "success", "data": data}), 200)

    async def _orderstatus(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        refused = await self._book_gate(body, ORDER_STATUS_SCHEMA)
        if refused:
            return refused
        for order in self.orders:
            if order.orderid == body["orderid"]:
                # services/orderstatus_service.py: the tradebook's price once complete, else 0.0
                filled = order.status == "complete"
                data = order.row() | {"average_price": order.price if filled else 0.0}
                return self._answer(self._moded({"status": "success", "data": data}), 200)
        message = f"Order {body['orderid']} not found"
        return self._answer(self._moded({"status": "error", "message": message}), 404)

    async def _funds(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        refused = await self._book_gate(body, KEY_ONLY_SCHEMA)
        if refused:
            return refused
        realized = sum(p.realized for p in self.book.values())
        data = {
            "availablecash": "1000000.00",
            "collateral": "0.00",
            "m2mrealized": f"{realized:.2f}",
            "m2munrealized": "0.00",
            "utiliseddebits": "0.00",
        }
        return self._answer(self._moded({"status": "success", "data": data}), 200)

    async def _analyzer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        data, errors = KEY_ONLY_SCHEMA.load(body)
        if errors:
            return self._answer({"status": "error", "message": str(errors)}, 400)
        if data["apikey"] != self.api_key or self.faults.unauthorised:
            return self._answer({"status": "error", "message": INVALID_KEY}, 403)
        return self._answer({"status": "success", "data": self._mode_data()}, 200)

    async def _analyzer_toggle(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        data, errors = TOGGLE_SCHEMA.load(body)
        if errors:
            return self._answer({"status": "error", "message": str(errors)}, 400)
        if data["apikey"] != self.api_key or self.faults.unauthorised:
            return self._answer({"status": "error", "message": INVALID_KEY}, 403)
        self.faults.analyze = data["mode"]
        mode = "analyze" if data["mode"] else "live"
        data = self._mode_data() | {"message": f"Analyzer mode switched to {mode}"}
        return self._answer({"status": "success", "data": data}, 200)

    # -- helpers

    async def _book_gate(self, body: dict[str, Any], schema: _Schema) -> web.StreamResponse | None:
        """Validation, key and faults of the non-order endpoints; None lets the call through."""
        _, errors = schema.load(body)
        if errors:
            return self._answer({"status": "error", "message": errors}, 400)
        if body["apikey"] != self.api_key or self.faults.unauthorised:
            return self._answer({"status": "error", "message": INVALID_KEY}, 403)
        if self.faults.books_too and self.faults.error_status:
            return self._answer({"status": "error", "message": "An unexpected error occurred"}, self.faults.error_status)  # fmt: skip
        if self.faults.books_too and self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        return None

    def _take_fault(self, symbol: str) -> bool:
        """Whether this order call gets the latency/error/drop faults (and counts it)."""
        f = self.faults
        if not (f.latency or f.error_status or f.drop_after_apply):
            return False
        if f.symbol is not None and f.symbol != symbol:
            return False
        if f.calls is not None:
            if f.calls <= 0:
                return False
            f.calls -= 1
        return True

    @staticmethod
    def _sandbox_refusal(exchange: str, product: str) -> str | None:
        # sandbox/order_manager.py _validate_order: product-exchange compatibility
        if exchange in ("NSE", "BSE") and product == "NRML":
            return f"NRML product not allowed for {exchange} equity segment. Use CNC for delivery or MIS for intraday."
        if exchange in DERIVATIVES and product == "CNC":
            return f"CNC product not allowed for {exchange} derivatives segment. Use NRML for carryforward or MIS for intraday."
        return None

    def _fill(
        self, symbol: str, exchange: str, product: str, action: str, quantity: int, strategy: str
    ) -> Order:
        """The order placed: filled at once, unless a fault rejects it or holds it open."""
        price = self.ltp.get(symbol, self.default_ltp)
        placed_at = self.clock().astimezone(IST)
        order = Order(
            orderid=f"{placed_at:%y%m%d}{next(self._ids):09d}",
            symbol=symbol, exchange=exchange, product=product, action=action,
            quantity=quantity, price=price, placed_at=placed_at,
            timestamp=placed_at.strftime("%Y-%m-%d %H:%M:%S"), strategy=strategy,
            mode="analyze" if self.faults.analyze else "live",
        )  # fmt: skip
        self.orders.append(order)
        if self.faults.rms_reject > 0:
            self.faults.rms_reject -= 1
            order.status = "rejected"
        elif self.faults.cancel > 0:
            self.faults.cancel -= 1
            part = int(quantity * self.faults.cancel_filled)
            if part:
                self._apply(order, part)
            order.status = "cancelled"
        elif self.faults.fill_after > 0:
            order.status = "open"
            later = asyncio.get_running_loop().call_later(
                self.faults.fill_after, self._apply, order
            )
            self._later.append(later)
        else:
            self._apply(order)
        return order

    def _apply(self, order: Order, quantity: int | None = None) -> None:
        """The order fills (`quantity` of it: all by default): the position moves."""
        symbol, action, price = order.symbol, order.action, order.price
        quantity = order.quantity if quantity is None else quantity
        order.status = "complete"
        held = self.book.setdefault((symbol, order.exchange, order.product), Position())
        signed = quantity if action == "BUY" else -quantity
        old, new = held.quantity, held.quantity + signed
        if old == 0 or old * signed > 0:  # opens or adds
            held.average_price = (abs(old) * held.average_price + quantity * price) / abs(new)
        else:  # reduces, closes or flips
            closed = min(abs(old), quantity)
            held.realized += closed * (price - held.average_price) * (1 if old > 0 else -1)
            if new == 0:
                held.average_price = 0.0
            elif new * old < 0:
                held.average_price = price
        held.quantity = new
        self.max_abs[symbol] = max(self.max_abs.get(symbol, 0), abs(new))

    def _moded(self, answer: dict[str, Any]) -> dict[str, Any]:
        return (answer | {"mode": "analyze"}) if self.faults.analyze else answer

    def _mode_data(self) -> dict[str, Any]:
        analyze = self.faults.analyze
        return {"mode": "analyze" if analyze else "live", "analyze_mode": analyze, "total_logs": 0}

    def _too_many(self) -> web.Response:
        answer = {
            "status": "error",
            "message": RATE_LIMITED,
            "retry_after": self.faults.retry_after,
        }
        return self._answer(answer, 429)

    def _answer(self, answer: dict[str, Any], status: int) -> web.Response:
        self.answers[status] += 1
        return web.json_response(answer, status=status)

    # -- control, for a harness in another process

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("a JSON object of faults")
            if changes.pop("clear", False):
                self.faults = Faults(analyze=self.faults.analyze, semi_auto=self.faults.semi_auto)
            self.faults.update(changes)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(dataclasses.asdict(self.faults))

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self.state())


# ---------------------------------------------------------------- as a process


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAlgo(
        args.api_key, rate=args.rate, order_rate=args.order_rate, api_rate=args.api_rate,
        smart_order_delay=args.smart_order_delay, broker=args.broker,
    )  # fmt: skip
    fake.faults.analyze = args.analyze
    url = await fake.start(args.host, args.port)
    print(f"ready {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.openalgo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", required=True)
    parser.add_argument(
        "--rate", type=int, default=10, help="smart orders per second (SMART_ORDER_RATE_LIMIT)"
    )
    parser.add_argument(
        "--order-rate", type=int, default=10, help="orders per second (ORDER_RATE_LIMIT)"
    )
    parser.add_argument(
        "--api-rate", type=int, default=50, help="other calls per second (API_RATE_LIMIT)"
    )
    parser.add_argument(
        "--smart-order-delay", type=float, default=0.5, help="SMART_ORDER_DELAY, live mode"
    )
    parser.add_argument(
        "--broker",
        choices=["angel", "zerodha"],
        default="angel",
        help="whose smart-order logic live mode follows",
    )
    parser.add_argument("--analyze", action="store_true", help="start in analyze (sandbox) mode")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
