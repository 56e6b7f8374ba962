"""The OpenAlgo adapter against the fake OpenAlgo, over real HTTP on 127.0.0.1.

Each test states one answer OpenAlgo can give and what the adapter makes of it,
then checks the fake's book: what was (or was not) placed at the "broker".
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from service.brokers.base import Instrument, OrderRequest, OrderResult
from service.brokers.openalgo import OpenAlgoBroker
from service.errors import BrokerModeMismatch, BrokerRefused, BrokerUnavailable
from tests.support.openalgo import IST, FakeOpenAlgo

API_KEY = "oa-key-7f3c9d21e5b84a60"
NIFTY = Instrument("NIFTY", "NFO", "NIFTY29DEC26FUT", "NRML", lot_size=75)
NIFTY_MIS = Instrument("NIFTY_MIS", "NFO", "NIFTY29DEC26FUT", "MIS", lot_size=75)
CRUDE = Instrument("CRUDE", "MCX", "CRUDEOILM20MAY26FUT", "NRML", lot_size=10)
_ids = itertools.count(1)

MakeBroker = Callable[..., Awaitable[OpenAlgoBroker]]


def order(
    instrument: Instrument = NIFTY, start: int = 0, target: int = 75, valid_for: float = 60
) -> OrderRequest:
    return OrderRequest(
        client_order_id=f"c-{next(_ids)}",
        instrument=instrument,
        action="BUY" if target > start else "SELL",
        start=start,
        target=target,
        price=None,
        epoch=1,
        instance_id="test",
        valid_until=datetime.now(UTC) + timedelta(seconds=valid_for),
    )


async def place(broker: OpenAlgoBroker, request: OrderRequest) -> Any:
    (answer,) = await broker.place_many([request])
    return answer


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "the fake never got there"
        await asyncio.sleep(0.05)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAlgo]:
    server = FakeOpenAlgo(API_KEY, smart_order_delay=0.0)
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def broker_for(fake: FakeOpenAlgo) -> AsyncIterator[MakeBroker]:
    made: list[OpenAlgoBroker] = []

    async def make(mode: str = "live", key: str = API_KEY, **options: Any) -> OpenAlgoBroker:
        broker = OpenAlgoBroker(fake.url, key, mode=mode, **{"timeout": 2.0, **options})
        await broker.start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
async def broker(broker_for: MakeBroker) -> OpenAlgoBroker:
    return await broker_for("live")


# -- the broker decided ------------------------------------------------------------


async def test_an_entry_is_filled_and_moves_the_position_to_the_target(broker, fake):
    answer = await place(broker, order(target=75))
    assert answer == OrderResult(fake.orders[0].orderid, "filled")
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75
    assert (fake.orders[0].action, fake.orders[0].quantity) == ("BUY", 75)
    assert await broker.positions([NIFTY]) == {"NIFTY": 75}


async def test_an_order_accepted_then_rejected_by_the_brokers_risk_checks_is_rejected(broker, fake):
    fake.faults.rms_reject = 1
    answer = await place(broker, order(target=75))
    (placed,) = fake.orders
    assert isinstance(answer, OrderResult) and answer.status == "rejected", answer
    assert answer.broker_order_id == placed.orderid
    assert answer.detail is not None and "then rejected by the broker" in answer.detail
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 0
    # The same target again goes out (the executor's next signal would): nothing filled.
    assert (await place(broker, order(target=75))).status == "filled"
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75


async def test_a_cancelled_order_is_judged_by_the_position_book(broker, fake):
    """Cancelled with nothing filled: rejected. Cancelled after half of it filled (the
    book's row says only "cancelled"): unknown, for the executor to settle in doubt."""
    fake.faults.cancel = 1
    clean = await place(broker, order(target=75))
    assert isinstance(clean, OrderResult) and clean.status == "rejected", clean
    assert (
        clean.detail is not None and "cancelled by the broker with nothing filled" in clean.detail
    )
    fake.faults.update({"cancel": 1, "cancel_filled": 0.6})
    part = await place(broker, order(target=75))
    assert isinstance(part, BrokerUnavailable), part
    assert "cancelled after part of it filled: the broker holds 45" in str(part)
    assert [o.status for o in fake.orders] == ["cancelled", "cancelled"]
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 45


async def test_an_order_open_a_moment_is_filled_once_the_book_says_complete(broker, fake):
    fake.faults.fill_after = 0.8
    began = time.monotonic()
    answer = await place(broker, order(target=75))
    assert answer == OrderResult(fake.orders[0].orderid, "filled")
    assert time.monotonic() - began >= 0.8  # not before the book said so
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75


async def test_an_order_still_open_when_its_time_is_up_is_an_unknown_outcome(broker, fake):
    fake.faults.fill_after = 30
    answer = await place(broker, order(target=75, valid_for=1.0))
    assert isinstance(answer, BrokerUnavailable), answer
    assert f"order {fake.orders[0].orderid} placed, still open" in str(answer)
    assert "outcome unknown" in str(answer)
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 0


async def test_a_burst_of_confirmations_shares_reads_of_the_order_book(broker_for, fake):
    broker = await broker_for("live", order_rate=1000.0)
    instruments = [Instrument(f"I{n}", "NFO", f"SYM{n}26DECFUT", "NRML") for n in range(10)]
    answers = await broker.place_many([order(i, target=1) for i in instruments])
    assert {a.status for a in answers} == {"filled"}, answers  # (the fake's 10/s: no 429)
    assert fake.answers[200] - 10 < 10  # fewer book reads than orders


async def test_sending_the_same_target_again_is_matched_and_places_nothing(broker, fake):
    entry = order(target=75)
    await place(broker, entry)
    again = await place(broker, entry)
    assert again == OrderResult(None, "matched", "Positions Already Matched. No Action needed.")
    assert len(fake.orders) == 1 and fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75


async def test_a_short_entry_is_a_sell_and_the_position_is_negative(broker, fake):
    assert (await place(broker, order(target=-150))).status == "filled"
    assert (fake.orders[0].action, fake.orders[0].quantity) == ("SELL", 150)
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == -150
    assert await broker.positions([NIFTY]) == {"NIFTY": -150}
    # Covering half of it is a reduction: a BUY of 75, the short stays.
    assert (await place(broker, order(start=-150, target=-75))).status == "filled"
    assert (fake.orders[1].action, fake.orders[1].quantity) == ("BUY", 75)
    assert await broker.positions([NIFTY]) == {"NIFTY": -75}


@pytest.mark.parametrize("mode", ["live", "analyze"])
async def test_a_replayed_exit_leaves_the_position_flat(broker_for, fake, mode):
    fake.faults.analyze = mode == "analyze"
    broker = await broker_for(mode)
    await place(broker, order(start=0, target=75))
    exit_order = order(start=75, target=0)
    assert (await place(broker, exit_order)).status == "filled"
    replayed = await place(broker, exit_order)
    # Live OpenAlgo answers this one with HTTP 500; the sandbox with 200. Both: nothing placed.
    assert replayed == OrderResult(
        None, "matched", "No OpenPosition Found. Not placing Exit order."
    )
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 0
    assert [o.action for o in fake.orders] == ["BUY", "SELL"]
    assert fake.answers[500] == (1 if mode == "live" else 0)


async def test_only_the_exit_quantity_keeps_a_replayed_exit_from_opening_a_position(broker, fake):
    """Why exits send quantity 0: with target 0 on a flat book, OpenAlgo places a plain
    order of whatever quantity it is sent."""
    replayed = await place(broker, order(start=75, target=0))  # the adapter's exit, book flat
    assert replayed.status == "matched" and fake.orders == []
    body = {
        "apikey": API_KEY, "strategy": "s", "exchange": "NFO", "symbol": "NIFTY29DEC26FUT",
        "action": "SELL", "product": "NRML", "pricetype": "MARKET",
        "quantity": "75", "position_size": "0",
    }  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.url}/api/v1/placesmartorder", json=body) as response:
            assert response.status == 200
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == -75  # opened from flat


async def test_zerodhas_no_action_answer_http_500_is_matched_too(broker, fake):
    fake.broker = "zerodha"  # live OpenAlgo on Zerodha: no-actions come back as HTTP 500
    await place(broker, order(start=0, target=75))
    again = await place(broker, order(start=0, target=75))
    assert again == OrderResult(None, "matched", "No action required")
    await place(broker, order(start=75, target=0))
    assert (await place(broker, order(start=75, target=0))).status == "matched"
    assert [o.action for o in fake.orders] == ["BUY", "SELL"] and fake.answers[500] == 2


@pytest.mark.parametrize(
    ("instrument", "field", "words"),
    [
        (Instrument("X", "NYSE", "IBM", "NRML"), "exchange", "Must be one of: NSE, NFO"),
        (Instrument("Y", "NFO", "NIFTY29DEC26FUT", "INTRADAY"), "product", "Must be one of: MIS"),
    ],
)
async def test_a_validation_error_is_rejected_with_openalgos_message(
    broker, fake, instrument, field, words
):
    answer = await place(broker, order(instrument))
    assert answer.status == "rejected" and answer.broker_order_id is None
    assert f"'{field}'" in answer.detail and words in answer.detail
    assert fake.orders == [] and fake.answers[400] == 1


async def test_the_sandbox_refuses_nrml_on_cash_equity(broker_for, fake):
    fake.faults.analyze = True
    broker = await broker_for("analyze")
    answer = await place(broker, order(Instrument("SBIN", "NSE", "SBIN", "NRML"), target=10))
    assert answer.status == "rejected" and "NRML product not allowed" in answer.detail
    assert fake.orders == []


async def test_an_order_whose_validity_ended_is_not_sent_and_goes_back_to_the_queue(broker, fake):
    answer = await place(broker, order(valid_for=-1))
    assert isinstance(answer, BrokerRefused) and answer.reason == "expired"
    assert fake.answers.total() == 0


async def test_semi_auto_mode_queues_the_order_for_a_human_and_places_nothing(broker, fake):
    fake.faults.semi_auto = True
    answer = await place(broker, order(target=75))
    assert answer == OrderResult(None, "awaiting_approval", "pending_order_id 1")
    assert fake.orders == [] and fake.pending[0]["position_size"] == 75.0
    assert "apikey" not in fake.pending[0]


# -- the broker refused: nothing placed, ask again later ------------------------------


async def test_a_bad_key_or_an_expired_session_is_refused_as_unauthorised(broker_for, fake):
    stranger = await broker_for("live", key="not-the-key")
    answer = await place(stranger, order())
    assert isinstance(answer, BrokerRefused)
    assert (answer.reason, answer.retry_after) == ("unauthorised", 10.0)
    assert "Invalid openalgo apikey" in str(answer) and "placesmartorder" in str(answer)

    broker = await broker_for("live")
    fake.faults.unauthorised = True  # the key is right, the broker session expired
    assert (await place(broker, order())).reason == "unauthorised"
    with pytest.raises(BrokerRefused) as refused:
        await broker.positions([NIFTY])
    assert refused.value.reason == "unauthorised"
    assert fake.orders == []
    fake.faults.unauthorised = False
    assert (await place(broker, order())).status == "filled"


async def test_a_rate_limited_answer_is_refused_and_holds_later_sends_back(broker, fake):
    fake.faults.rate_limited = 1
    fake.faults.retry_after = 2
    first, second = await broker.place_many([order(NIFTY), order(CRUDE, target=10)])
    assert isinstance(first, BrokerRefused) and first.reason == "rate_limited"
    assert first.retry_after == 2.0 and "Rate limit exceeded" in str(first)
    # The second went out after the 429 had come back: held here, never sent.
    assert isinstance(second, BrokerRefused) and second.reason == "rate_limited"
    assert 0 < second.retry_after <= 2.0
    assert fake.answers[429] == 1 and fake.answers.total() == 1 and fake.orders == []


# -- the outcome is unknown ---------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_server_error_is_an_unknown_outcome(broker, fake, status):
    fake.faults.error_status = status
    answer = await place(broker, order())
    assert isinstance(answer, BrokerUnavailable) and f"HTTP {status}" in str(answer)
    assert fake.orders == []


async def test_a_connection_dropped_after_the_order_was_applied_is_an_unknown_outcome(broker, fake):
    fake.faults.drop_after_apply = True
    fake.faults.calls = 1
    answer = await place(broker, order(target=75))
    assert isinstance(answer, BrokerUnavailable)
    # ... and it did happen: reconciliation reads it back.
    assert fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75
    assert await broker.positions([NIFTY]) == {"NIFTY": 75}
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) - timedelta(minutes=1))) == 1


async def test_an_answer_slower_than_the_timeout_is_unknown_and_the_order_still_lands(
    broker_for, fake
):
    broker = await broker_for("live", timeout=0.3)
    fake.faults.latency = 1.0
    fake.faults.symbol = "NIFTY29DEC26FUT"
    answer = await place(broker, order(target=75))
    assert isinstance(answer, BrokerUnavailable) and "no answer within 0.3s" in str(answer)
    assert fake.orders == []  # not yet ...
    await eventually(lambda: fake.position("NIFTY29DEC26FUT", "NFO", "NRML") == 75)


async def test_different_instruments_go_out_side_by_side(broker, fake):
    fake.faults.latency = 0.5
    started = time.monotonic()
    answers = await broker.place_many(
        [order(NIFTY), order(CRUDE, target=10), order(NIFTY_MIS, target=-75)]
    )
    assert [a.status for a in answers] == ["filled"] * 3
    assert time.monotonic() - started < 1.3  # one after the other would take 1.5 s


# -- the broker answered in another mode ------------------------------------------------


async def test_an_analyze_answer_to_a_live_gateway_is_a_mode_mismatch(broker, fake):
    fake.faults.analyze = True
    assert isinstance(await place(broker, order()), BrokerModeMismatch)
    with pytest.raises(BrokerModeMismatch, match="analyze"):
        await broker.positions([NIFTY])
    with pytest.raises(BrokerModeMismatch):
        await broker.orders_since(NIFTY, datetime.now(UTC))


async def test_a_live_answer_to_an_analyze_gateway_is_a_mode_mismatch(broker_for, fake):
    broker = await broker_for("analyze")
    answer = await place(broker, order())
    assert isinstance(answer, BrokerModeMismatch) and "may be real" in str(answer)
    assert len(fake.orders) == 1  # it was: the executor must find out from the books
    with pytest.raises(BrokerModeMismatch):
        await broker.positions([NIFTY])


async def test_an_analyze_gateway_trades_with_an_analyze_server(broker_for, fake):
    fake.faults.analyze = True
    broker = await broker_for("analyze")
    assert (await place(broker, order(target=75))).status == "filled"
    assert await broker.positions([NIFTY]) == {"NIFTY": 75}
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) - timedelta(minutes=1))) == 1


# -- reconciliation -----------------------------------------------------------------------


async def test_positions_are_told_apart_by_product_and_closed_rows_read_zero(broker, fake):
    await broker.place_many([order(NIFTY, target=75), order(NIFTY_MIS, target=-150)])
    assert await broker.positions([NIFTY, NIFTY_MIS, CRUDE]) == {
        "NIFTY": 75,
        "NIFTY_MIS": -150,
        "CRUDE": 0,
    }
    await place(broker, order(NIFTY_MIS, start=-150, target=0))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{fake.url}/api/v1/positionbook", json={"apikey": API_KEY}) as r:
            rows = (await r.json())["data"]
    assert {"product": "MIS", "quantity": "0"}.items() <= next(
        row for row in rows if row["product"] == "MIS"
    ).items()  # OpenAlgo keeps the closed row, its numbers as strings
    assert await broker.positions([NIFTY, NIFTY_MIS]) == {"NIFTY": 75, "NIFTY_MIS": 0}


async def test_orders_since_counts_this_instruments_orders_at_or_after_the_time(broker, fake):
    now = datetime.now(IST)
    fake.clock = lambda: now - timedelta(hours=1)
    await place(broker, order(NIFTY, start=0, target=75))  # an hour ago
    fake.clock = lambda: datetime.now(IST)
    await place(broker, order(NIFTY, start=75, target=150))  # now
    await place(broker, order(NIFTY_MIS, target=75))  # same symbol, another product
    await place(broker, order(CRUDE, target=10))  # another symbol

    assert fake.orders[0].timestamp == (now - timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) - timedelta(minutes=10))) == 1
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) - timedelta(hours=2))) == 2
    # The stamps are Indian time without a zone; read as UTC they would lie 5.5 h ahead.
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) + timedelta(hours=1))) == 0
    # A stamp that cannot be read counts: better a needless check than a double order.
    fake.orders.append(replace(fake.orders[0], orderid="x1", timestamp="sometime today"))
    assert len(await broker.orders_since(NIFTY, datetime.now(UTC) + timedelta(hours=1))) == 1


async def test_a_book_call_that_fails_raises_unavailable(broker, fake):
    fake.faults.error_status = 500
    fake.faults.books_too = True
    with pytest.raises(BrokerUnavailable, match="openalgo positionbook: HTTP 500"):
        await broker.positions([NIFTY])
    with pytest.raises(BrokerUnavailable, match="openalgo orderbook: HTTP 500"):
        await broker.orders_since(NIFTY, datetime.now(UTC))


# -- pacing and secrets ------------------------------------------------------------------


async def test_thirty_orders_on_thirty_instruments_stay_under_openalgos_rate_limit(
    broker_for, fake
):
    broker = await broker_for("live", order_rate=10.0)  # the fake allows 10/s, moving window
    instruments = [Instrument(f"I{i}", "NFO", f"SYM{i}FUT", "NRML") for i in range(30)]
    started = time.monotonic()
    answers = await broker.place_many([order(i, target=1) for i in instruments])
    elapsed = time.monotonic() - started
    assert [a.status for a in answers] == ["filled"] * 30
    assert fake.answers[429] == 0 and len(fake.orders) == 30
    assert 2.0 < elapsed < 15.0


async def test_the_api_key_appears_in_no_log_no_error_and_no_repr(broker_for, fake):
    broker = await broker_for("live", timeout=0.3)
    texts: list[str] = [repr(broker), str(vars(broker))]
    with structlog.testing.capture_logs() as logs:
        texts.append(repr(await place(broker, order(target=75))))
        fake.faults.error_status = 500
        texts.append(repr(await place(broker, order(target=75))))
        fake.faults.error_status = None
        fake.faults.latency = 1.0
        texts.append(repr(await place(broker, order(target=150))))
        fake.faults.latency = 0.0
        fake.faults.unauthorised = True
        texts.append(repr(await place(broker, order(target=150))))
        for call in (broker.positions([NIFTY]), broker.orders_since(NIFTY, datetime.now(UTC))):
            with pytest.raises(BrokerRefused) as refused:
                await call
            texts.append(str(refused.value))
        fake.faults.unauthorised = False
        texts.append(repr(await place(broker, order(Instrument("Z", "XX", "Z", "NRML")))))
    assert len(logs) >= 5
    texts.append(repr(logs))
    assert not [text for text in texts if API_KEY in text]
    assert "***" in repr(broker)


# -- the fake as a process of its own (for the chaos harness) ---------------------------


async def test_the_fake_runs_as_a_process_driven_over_http():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.openalgo", "--port", "0", "--api-key", API_KEY,
        cwd=Path(__file__).resolve().parents[2], stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        assert line.startswith(b"ready http://127.0.0.1:")
        url = line.decode().split()[1]
        broker = OpenAlgoBroker(url, API_KEY, mode="live")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/_fake/faults", json={"calls": 1, "error_status": 503}):
                pass
            assert isinstance(await place(broker, order(target=75)), BrokerUnavailable)
            assert (await place(broker, order(target=75))).status == "filled"
            async with session.get(f"{url}/_fake/state") as response:
                state = await response.json()
            assert state["max_abs_positions"] == {"NIFTY29DEC26FUT": 75}
            assert [o["quantity"] for o in state["orders"]] == [75]
            async with session.post(f"{url}/_fake/reset") as response:
                assert (await response.json())["orders"] == []
        await broker.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
