"""The gateway trading at OpenAlgo: real `pgleader serve` processes, real HTTP both
ways, the fake OpenAlgo (tests.support.openalgo) as the broker.

Orders are target net positions (service.brokers.base): each test posts webhooks,
then reads the outcome in the database and at the fake, whose book is what a
broker account would hold. Most tests share one live-mode gateway and one fake
(module scope), each test on instruments of its own so that no two tests meet at
a position; a test that changes the gateway itself (a pause, a halt, another
mode) gets a database, a fake and a gateway of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.support.database import cloned_database
from tests.support.gateway import (
    OPENALGO_KEY,
    Traded,
    Trading,
    eventually,
    futures,
    trading_at,
    until,
)
from tests.support.openalgo import FakeOpenAlgo, Faults, Position

pytestmark = pytest.mark.asyncio(loop_scope="module")

SHARED = {
    **futures(
        "LONG_RT", "SEMI_AUTO", "UNKNOWN_5XX", "UNKNOWN_DROP", "UNKNOWN_SLOW", "MANUAL",
        "REPLAY_EXIT", "RMS_REJECT",
    ),
    "SHORT_RT": Traded("NFO", "BANKNIFTY29DEC26FUT", lot_size=30),
    "LABEL_RT": Traded("MCX", "CRUDEOILM18DEC26FUT", lot_size=10),
}  # fmt: skip


@pytest.fixture(scope="module")
def shared_dsn(pg_template: Any) -> Iterator[str]:
    with cloned_database(pg_template, "pgleader_openalgo_gateway") as dsn:
        yield dsn


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_trading(
    shared_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Trading]:
    """One live-mode gateway at one fake for the module, with short broker timings:
    an order without an answer in 0.5 s is settled 1.5 s after its claim."""
    tmp = Path(tmp_path_factory.mktemp("openalgo-gateway"))
    async with trading_at(shared_dsn, tmp, SHARED, broker_timeout=0.5, broker_settle=1.5) as t:
        yield t


@pytest_asyncio.fixture(loop_scope="module")
async def trading(shared_trading: Trading) -> AsyncIterator[Trading]:
    """The shared gateway; a fault a test sets at the fake ends with the test."""
    yield shared_trading
    shared_trading.fake.faults = Faults()


MakeTrading = Callable[..., Awaitable[Trading]]


@pytest_asyncio.fixture(loop_scope="module")
async def own_trading(dsn: str, tmp_path: Path) -> AsyncIterator[MakeTrading]:
    """own_trading(traded, fake=None, **settings): a database, a fake and a gateway of this
    test's own, for a test that changes the gateway's state (a pause, a halt)."""
    async with AsyncExitStack() as stack:

        async def make(traded: Mapping[str, Traded], **options: Any) -> Trading:
            return await stack.enter_async_context(trading_at(dsn, tmp_path, traded, **options))

        yield make


# ------------------------------------------------------------------ round trips


async def test_long_and_short_round_trips_move_the_broker_by_lots_times_lot_size(trading):
    steps = [("BASE_ENTRY", 2, 2), ("PYRAMID", 1, 3), ("EXIT", 1, 2), ("EXIT", 0, 0)]
    for name, side, label, sign in [
        ("LONG_RT", "long", "Long_1", 1),
        ("SHORT_RT", "short", "Trend_1", -1),  # the side says short
        ("LABEL_RT", None, "Short_1", -1),  # the label says short, no side given
    ]:
        lot = trading.traded[name].lot_size
        for kind, lots, held_lots in steps:
            side_field = {"side": side} if side else {}
            status, answer = await trading.post(
                type=kind, instrument=name, position=label, lots=lots, **side_field
            )
            assert (status, answer["status"]) == (200, "executed"), (name, kind, answer)
            assert trading.held(name) == sign * held_lots * lot, (name, kind)
        opens, closes = ("BUY", "SELL") if sign > 0 else ("SELL", "BUY")
        assert trading.orders(name) == [
            (opens, 2 * lot), (opens, lot), (closes, lot), (closes, 2 * lot),
        ], name  # fmt: skip
        assert trading.fake.max_abs[trading.traded[name].symbol] == 3 * lot, name
        open_lots = await trading.gw.scalar(
            "select count(*) from gateway.positions where instrument = %s and status = 'open'",
            name,
        )
        assert open_lots == 0, name

    # What an operator reads of the last short: its side, and each order's start and target.
    signal_id = await trading.gw.scalar(
        "select max(id) from gateway.signals where instrument = 'SHORT_RT' and type = 'PYRAMID'"
    )
    _, shown = await trading.gw.get(trading.node, f"/signals/{signal_id}")
    assert shown["side"] == "short" and shown["status"] == "executed", shown
    (order,) = shown["orders"]
    assert {k: order[k] for k in ("action", "start_position", "target_position", "outcome")} == {
        "action": "SELL", "start_position": -60, "target_position": -90, "outcome": "filled",
    }  # fmt: skip
    assert order["symbol"] == "NFO:BANKNIFTY29DEC26FUT:NRML"


# ------------------------------------------------------------------ answer classes


async def test_a_validation_refusal_fails_the_signal_with_openalgos_message(own_trading):
    # OpenAlgo's sandbox (analyze mode) refuses NRML on an equity segment with a 400.
    t = await own_trading({"INFY_EQ": Traded("NSE", "INFY", lot_size=1)}, openalgo_mode="analyze")
    t.fake.faults.analyze = True
    status, answer = await t.post(instrument="INFY_EQ", lots=5)
    assert (status, answer["status"]) == (200, "failed"), answer
    detail = await t.gw.scalar(
        "select detail from gateway.signals where id = %s", answer["signal_id"]
    )
    assert "NRML product not allowed for NSE equity segment" in detail, detail
    (row,) = await t.order_rows(answer["signal_id"])
    assert row[0] == "rejected" and "NRML product not allowed for NSE" in row[4], row
    (alert,) = await t.gw.alerts("order_rejected")
    assert "INFY_EQ" in alert and "NRML product not allowed for NSE" in alert, alert
    assert t.orders("INFY_EQ") == []


async def test_an_order_accepted_then_rejected_by_the_broker_fails_and_moves_nothing(trading):
    """Placed is not filled: the broker's risk checks reject an order after its orderid."""
    trading.fake.faults.rms_reject = 1
    status, answer = await trading.post(instrument="RMS_REJECT", lots=2)
    assert (status, answer["status"]) == (200, "failed"), answer
    (row,) = await trading.order_rows(answer["signal_id"])
    assert row[0] == "rejected" and "then rejected by the broker" in row[4], row
    alerts = [a for a in await trading.gw.alerts("order_rejected") if "RMS_REJECT" in a]
    assert len(alerts) == 1 and "nothing filled" in alerts[0], alerts
    assert trading.held("RMS_REJECT") == 0
    open_rows = "select count(*) from gateway.positions where instrument = 'RMS_REJECT'"
    assert await trading.gw.scalar(open_rows) == 0
    # The broker's position is still the ledger's: the next entry trades.
    status, answer = await trading.post(instrument="RMS_REJECT", lots=1)
    assert (status, answer["status"]) == (200, "executed"), answer
    assert trading.held("RMS_REJECT") == trading.traded["RMS_REJECT"].lot_size


async def test_an_expired_broker_session_holds_the_signal_until_it_is_back(own_trading):
    t = await own_trading(futures("SESSION"))
    t.fake.faults.unauthorised = True  # OpenAlgo's 403: bad key, or the broker login expired
    status, answer = await t.post(instrument="SESSION", lots=1)
    assert (status, answer["status"]) == (202, "accepted"), answer
    await until(lambda: t.gw.alerts("broker_unauthorised"))
    assert await t.status(answer["signal_id"]) == "pending"  # not rejected: it waits
    assert t.orders("SESSION") == []

    t.fake.faults.unauthorised = False  # a human logged in again
    # The gateway asks again once its pause after a 403 is over (10 s at least).
    await t.reaches(answer["signal_id"], "executed", timeout=45)
    assert t.orders("SESSION") == [("BUY", 75)]
    assert len(await t.gw.alerts("broker_unauthorised")) == 1


async def test_rate_limited_orders_are_sent_again_soon_and_none_is_lost(own_trading):
    # OpenAlgo takes one smart order a second here; the gateway is allowed ten.
    fake = FakeOpenAlgo(OPENALGO_KEY, rate=1, smart_order_delay=0.0)
    t = await own_trading(futures("RATE_A", "RATE_B"), fake=fake)
    answers = await asyncio.gather(
        t.post(instrument="RATE_A", lots=1), t.post(instrument="RATE_B", lots=2)
    )
    ids = [answer["signal_id"] for _, answer in answers]
    assert await t.gw.settled(ids, timeout=15) == dict.fromkeys(ids, "executed")
    assert fake.answers[429] >= 1
    assert (t.orders("RATE_A"), t.orders("RATE_B")) == ([("BUY", 75)], [("BUY", 150)])


async def test_a_rate_limited_position_check_holds_orders_back_seconds_not_a_minute(
    own_trading,
):
    t = await own_trading(futures("RATE_C"))
    # The position check before the order meets OpenAlgo's 429, whose "retry_after"
    # is always 60 while its limiter's window is one second (app.py).
    t.fake.faults.rate_limited = 1
    status, answer = await t.post(instrument="RATE_C", lots=1)
    assert (status, answer["status"]) == (202, "accepted"), answer
    assert t.fake.answers[429] == 1
    try:
        await t.reaches(answer["signal_id"], "executed", timeout=10)
    except TimeoutError:
        pytest.fail("a 429 on the position check held every order back for more than 10 s")
    assert t.orders("RATE_C") == [("BUY", 75)]


async def test_semi_auto_mode_leaves_the_signal_awaiting_approval(trading):
    trading.fake.faults.semi_auto = True  # OpenAlgo queues orders in its Action Center
    status, answer = await trading.post(instrument="SEMI_AUTO", lots=1)
    assert (status, answer["status"]) == (202, "accepted"), answer
    assert await trading.status(answer["signal_id"]) == "awaiting_approval"
    (row,) = await trading.order_rows(answer["signal_id"])
    assert row[:3] == ("awaiting_approval", 0, 75), row
    alerts = await trading.gw.alerts("order_awaiting_approval")
    assert any("SEMI_AUTO" in a for a in alerts), alerts
    (queued,) = [p for p in trading.fake.pending if p["symbol"] == "SEMIAUTO29DEC26FUT"]
    assert int(queued["position_size"]) == 75
    assert trading.orders("SEMI_AUTO") == [] and trading.held("SEMI_AUTO") == 0
    booked = await trading.gw.scalar(
        "select count(*) from gateway.positions where instrument = 'SEMI_AUTO'"
    )
    assert booked == 0  # the ledger waits for the fill


async def test_an_answer_in_the_other_mode_puts_the_signal_in_doubt_and_halts(own_trading):
    t = await own_trading(futures("MODE_A", "MODE_B"), broker_timeout=2, broker_settle=4)
    # The order waits at OpenAlgo while someone switches it to analyze (sandbox) mode.
    t.fake.faults.update({"latency": 0.5, "calls": 1, "symbol": "MODEA29DEC26FUT"})
    posting = asyncio.create_task(t.post(instrument="MODE_A", lots=1))
    await eventually(lambda: t.fake.faults.calls == 0)  # the order is in its latency
    t.fake.faults.analyze = True
    status, answer = await posting
    assert status == 202, answer
    assert await t.status(answer["signal_id"]) == "in_doubt"
    assert await t.halt_mode() == "halted"
    (alert,) = await t.gw.alerts("trading_halted")
    assert "analyze" in alert, alert
    assert len(await t.gw.alerts("signal_in_doubt")) == 1
    assert [o.mode for o in t.fake.orders] == ["analyze"]  # the sandbox took it: not real

    # Halted: the next signal is not sent, whatever mode OpenAlgo is in now.
    placed = len(t.fake.orders)
    status, answer = await t.post(instrument="MODE_B", lots=1)
    assert (status, answer["status"]) == (202, "accepted"), answer
    assert await t.status(answer["signal_id"]) == "pending"
    assert len(t.fake.orders) == placed


# ------------------------------------------------------------------ unknown outcomes


@pytest.mark.parametrize(
    ("name", "fault", "outcomes"),
    [
        # 5xx before applying: nothing placed, so the same target goes again.
        ("UNKNOWN_5XX", {"error_status": 500}, ["not_sent", "filled"]),
        # Applied, then the connection dropped: settled as executed, not sent again.
        ("UNKNOWN_DROP", {"drop_after_apply": True}, ["filled"]),
        # Applied after the client gave up (0.75 s > the 0.5 s timeout), before the
        # settle time (1.5 s): the same.
        ("UNKNOWN_SLOW", {"latency": 0.75}, ["filled"]),
    ],
    ids=["5xx-before-applying", "applied-then-dropped", "applied-after-timeout"],
)
async def test_an_unknown_outcome_is_settled_by_asking_and_placed_exactly_once(
    trading, name, fault, outcomes
):
    symbol = trading.traded[name].symbol
    trading.fake.faults.update({**fault, "calls": 1, "symbol": symbol})
    status, answer = await trading.post(instrument=name, lots=2)
    assert (status, answer["status"]) == (202, "accepted"), answer
    await trading.reaches(answer["signal_id"], "executed")
    assert trading.orders(name) == [("BUY", 150)]
    assert trading.held(name) == 150
    rows = await trading.order_rows(answer["signal_id"])
    assert [r[0] for r in rows] == outcomes, rows
    assert {(r[1], r[2]) for r in rows} == {(0, 150)}  # one target, however often sent


# ------------------------------------------------------------------ positions not ours


async def test_a_manual_trade_at_the_broker_stops_the_next_order_in_doubt(trading):
    status, answer = await trading.post(instrument="MANUAL", lots=1)
    assert (status, answer["status"]) == (200, "executed"), answer
    # Someone buys 25 more by hand, through OpenAlgo itself.
    manual = {
        "apikey": OPENALGO_KEY, "strategy": "by hand", "exchange": "NFO",
        "symbol": "MANUAL29DEC26FUT", "action": "BUY", "quantity": "25", "product": "NRML",
    }  # fmt: skip
    async with trading.gw.http.post(f"{trading.fake.url}/api/v1/placeorder", json=manual) as r:
        assert r.status == 200, await r.text()
    assert trading.held("MANUAL") == 100

    status, answer = await trading.post(instrument="MANUAL", type="PYRAMID", lots=1)
    assert status == 202, answer
    assert await trading.status(answer["signal_id"]) == "in_doubt"
    (row,) = await trading.order_rows(answer["signal_id"])
    assert row[:3] == ("not_sent", 75, 150), row
    alerts = [a for a in await trading.gw.alerts("signal_in_doubt") if "MANUAL29DEC26FUT" in a]
    assert len(alerts) == 1, alerts
    assert "holds 100" in alerts[0] and "ledger 75" in alerts[0], alerts[0]
    assert trading.orders("MANUAL") == [("BUY", 75), ("BUY", 25)]  # nothing more sent
    assert trading.held("MANUAL") == 100


async def test_an_exit_sent_twice_never_opens_a_position(trading):
    """OpenAlgo places a plain order when target and position are both 0 and the
    quantity is not: an exit that arrives a second time must not open a short."""
    name, traded = "REPLAY_EXIT", trading.traded["REPLAY_EXIT"]
    # Long 2 lots on both sides, with no order of it in OpenAlgo's book today.
    trading.fake.book[(traded.symbol, traded.exchange, traded.product)] = Position(150, 100.0)
    await trading.gw.query(
        "insert into gateway.positions (instrument, position, side, is_base_position, lots)"
        " values (%s, 'Long_1', 'long', true, 2)",
        name,
    )
    # The first send waits at OpenAlgo past the settle time: found not placed, it is
    # sent again (the same target, 0), and then the first one lands too.
    trading.fake.faults.update({"latency": 4.0, "calls": 1, "symbol": traded.symbol})
    late_answers = trading.fake.answers[500]
    status, answer = await trading.post(instrument=name, type="EXIT", position="Long_1", lots=0)
    assert status == 202, answer
    await trading.reaches(answer["signal_id"], "executed")
    rows = await trading.order_rows(answer["signal_id"])
    assert [(r[0], r[2]) for r in rows] == [("not_sent", 0), ("filled", 0)], rows
    # The first send's late answer: live OpenAlgo's "No OpenPosition Found", as a 500.
    await eventually(lambda: trading.fake.answers[500] > late_answers)
    assert trading.orders(name) == [("SELL", 150)]
    assert trading.held(name) == 0
    assert trading.fake.max_abs[traded.symbol] == 0  # no fill ever left it off flat


# ------------------------------------------------------------------ what the gateway takes


async def test_an_instrument_not_in_the_instruments_file_is_refused_and_not_stored(trading):
    stored = await trading.gw.scalar("select count(*) from gateway.signals")
    status, answer = await trading.post(instrument="NOT_LISTED", lots=1)
    assert (status, answer["status"], answer.get("field")) == (400, "invalid", "instrument"), answer
    assert "NOT_LISTED" in answer["error"], answer
    assert await trading.gw.scalar("select count(*) from gateway.signals") == stored


async def test_instances_with_other_trading_settings_are_flagged(trading):
    (other,) = await trading.gw.start(1, env={**trading.env, "PGLEADER_MAX_SIGNAL_AGE": "300"})
    try:

        async def flagged() -> bool:
            alerts = await trading.gw.alerts("settings_disagree")
            return any(other.instance_id in a and trading.node.instance_id in a for a in alerts)

        await until(flagged)
        _, view = await trading.gw.get(trading.node, "/coordinator/leader")
        disagreeing = view["trading"]["disagreeing_instances"]
        assert [d.split()[0] for d in disagreeing] == [other.instance_id], view["trading"]
        _, view = await trading.gw.get(other, "/coordinator/leader")
        assert [d.split()[0] for d in view["trading"]["disagreeing_instances"]] == [
            trading.node.instance_id
        ]
    finally:
        await other.stop()
