"""The batching executor and the one-statement fence, in process, on a real PostgreSQL."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgleader import Fenced, fenced_statement
from pgleader.fencing import FENCED_SQLSTATE


async def store_pending(db, n: int, *, instrument: str = "NIFTY") -> list[int]:
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by)"
        " select md5(random()::text), 'BASE_ENTRY', %s, 'Long_' || g, 1, 100, now(), '{}', 't'"
        "   from generate_series(1, %s) g returning id",
        [instrument, n],
    )
    return [r[0] for r in await cur.fetchall()]


async def test_concurrent_signals_go_out_in_batches_and_each_exactly_once(db, executor_for):
    executor = await executor_for()
    ids = []
    for n in range(30):  # 30 instruments, 10 entries each
        ids += await store_pending(db, 10, instrument=f"I{n}")
    statuses = await asyncio.gather(*(executor.execute(sid) for sid in ids))
    assert statuses == ["executed"] * len(ids)
    cur = await db.execute(
        "select count(*), count(distinct client_order_id) from gateway.paper_broker_requests"
    )
    assert await cur.fetchone() == (300, 300)
    cur = await db.execute("select count(*), sum(lots) from gateway.positions")
    assert await cur.fetchone() == (300, 300)
    # Each instrument's orders one at a time, the instruments side by side: batches
    # carry many instruments at once.
    stats = executor.batch_stats
    assert stats["batches"] < 150 and stats["largest"] > 1


async def test_an_instruments_signals_are_sent_one_at_a_time_each_from_the_last_target(
    db, executor_for
):
    executor = await executor_for()
    ids = await store_pending(db, 20)
    statuses = await asyncio.gather(*(executor.execute(sid) for sid in ids))
    assert statuses == ["executed"] * 20
    cur = await db.execute(
        "select o.start_position, o.target_position from gateway.orders o order by o.id"
    )
    assert await cur.fetchall() == [(n, n + 1) for n in range(20)]
    cur = await db.execute(
        "select count(*) from gateway.paper_broker_requests where target is not null"
    )
    assert await cur.fetchone() == (20,)


async def test_the_same_signal_asked_for_twice_at_once_is_sent_once(db, executor_for):
    executor = await executor_for()
    (sid,) = await store_pending(db, 1)
    assert await asyncio.gather(executor.execute(sid), executor.execute(sid)) == ["executed"] * 2
    assert await executor.execute(sid) == "executed"  # already done: nothing is sent again
    cur = await db.execute("select count(*) from gateway.paper_broker_requests")
    assert await cur.fetchone() == (1,)


async def test_a_batch_with_a_superseded_epoch_claims_nothing(db, executor_for):
    executor = await executor_for()
    ids = await store_pending(db, 5)
    stale = executor.elector.epoch
    # A newer leader's bump, as the database sees it (our lease has not run out yet).
    await db.execute("update pgleader.election set epoch = epoch + 1 where name = 'gateway'")
    statuses = await asyncio.gather(*(executor.execute(sid) for sid in ids))
    assert statuses == ["not_leader"] * 5
    cur = await db.execute("select distinct status from gateway.signals")
    assert await cur.fetchall() == [("pending",)]
    cur = await db.execute("select count(*) from gateway.orders")
    assert await cur.fetchone() == (0,)
    assert executor.counts["fenced"] == 5
    with pytest.raises(Fenced) as raised:
        with fenced_statement("gateway", stale):
            await db.execute(
                "select * from gateway.claim_signals('gateway', %s, %s, 'x', 'paper', '1 h',"
                " null, '0 s', 'wait')",
                [stale, ids],
            )
    assert raised.value.current == stale + 1


async def test_the_sql_fence_raises_its_own_sqlstate_and_holds_the_row_until_commit(db, dsn):

    await db.execute("insert into pgleader.election (name, epoch) values ('fence', 4)")
    cur = await db.execute("select pgleader.check_epoch('fence', 4)")
    assert await cur.fetchone() == (4,)
    with pytest.raises(psycopg.Error) as raised:
        await db.execute("select pgleader.check_epoch('fence', 3)")
    assert raised.value.sqlstate == FENCED_SQLSTATE
    with pytest.raises(Fenced):  # no such election: nobody's epoch is current
        with fenced_statement("nowhere", 1):
            await db.execute("select pgleader.check_epoch('nowhere', 1)")
    # While a fenced transaction is open, a bump of the epoch waits for it.
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("select pgleader.check_epoch('fence', 4)")
        await db.execute("set lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            await db.execute("update pgleader.election set epoch = 5 where name = 'fence'")
        await holder.rollback()
    await db.execute("update pgleader.election set epoch = 5 where name = 'fence'")


async def test_a_follower_drops_queued_work(db, executor_for):
    executor = await executor_for()
    await executor.elector.stop()
    ids = await store_pending(db, 3)
    executor.enqueue(ids)
    assert executor.backlog == 0
    assert await executor.execute(ids[0]) == "not_leader"
    cur = await db.execute("select count(*) from gateway.signals where status = 'pending'")
    assert await cur.fetchone() == (3,)


# --- target positions, long and short --------------------------------------------
#
# A book of signals on one instrument, executed in process against the paper broker;
# every test reads the outcome from the database: the ledger, the orders sent, and
# the paper broker's own book (what the outside world saw).


async def signal(
    db, kind: str, side: str, *, lots: int = 1, instrument: str = "NIFTY", at: str = "0 s",
    position: str | None = None, received: str = "1 min",
) -> int:  # fmt: skip
    """Store one pending signal `at` ago (signal time), received `received` ago."""
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, side, lots,"
        " price, signal_at, payload, received_by, received_at)"
        " values (md5(random()::text), %s, %s, %s, %s, %s, 100,"
        " date_trunc('second', now()) - %s::interval, '{}', 't', now() - %s::interval)"
        " returning id",
        [kind, instrument, position or f"{side}_{kind}", side, lots, at, received],
    )
    return (await cur.fetchone())[0]


async def paper_position(db, instrument: str = "NIFTY") -> int:
    cur = await db.execute(
        "select coalesce(sum(case action when 'BUY' then quantity else -quantity end), 0)"
        " from gateway.paper_broker_requests where instrument = %s",
        [instrument],
    )
    return (await cur.fetchone())[0]


async def ledger(db, instrument: str = "NIFTY") -> tuple[str | None, int]:
    cur = await db.execute("select side, lots from gateway.open_position(%s)", [instrument])
    return await cur.fetchone()


async def status_of(db, signal_id: int) -> tuple[str, str | None]:
    cur = await db.execute("select status, detail from gateway.signals where id = %s", [signal_id])
    return await cur.fetchone()


async def alerts(db, signal_id: int) -> list[str]:
    cur = await db.execute("select kind from gateway.alerts where signal_id = %s", [signal_id])
    return [r[0] for r in await cur.fetchall()]


@pytest.mark.parametrize("side", ["long", "short"])
async def test_every_type_trades_its_own_side(db, executor_for, side):
    """Entry, pyramid, partial exit and full exit, each sent as the target of its side:
    a short is sold, never bought."""
    executor = await executor_for()
    sign = 1 if side == "long" else -1
    opening = "BUY" if side == "long" else "SELL"
    closing = "SELL" if side == "long" else "BUY"
    steps = [("BASE_ENTRY", 2, 2, opening), ("PYRAMID", 1, 3, opening),
             ("EXIT", 1, 2, closing), ("EXIT", 0, 0, closing)]  # fmt: skip
    for kind, lots, held, action in steps:
        sid = await signal(db, kind, side, lots=lots)
        assert await executor.execute(sid) == "executed", await status_of(db, sid)
        cur = await db.execute(
            "select action, target_position from gateway.orders where signal_id = %s", [sid]
        )
        assert await cur.fetchone() == (action, sign * held)
        assert await paper_position(db) == sign * held
    assert await ledger(db) == (None, 0)


@pytest.mark.parametrize("side", ["long", "short"])
async def test_an_exit_closes_only_its_own_side(db, executor_for, side):
    executor = await executor_for()
    other = "short" if side == "long" else "long"
    assert await executor.execute(await signal(db, "BASE_ENTRY", other, lots=2)) == "executed"
    exit_id = await signal(db, "EXIT", side)
    assert await executor.execute(exit_id) == "rejected"
    _status, detail = await status_of(db, exit_id)
    assert f"nothing open on the {side} side" in detail
    assert "signal_rejected" in await alerts(db, exit_id)
    assert await ledger(db) == (other, 2)
    assert await paper_position(db) == (2 if other == "long" else -2)


async def test_an_exit_of_more_lots_than_open_closes_to_flat_never_through(db, executor_for):
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "short", lots=2))
    exit_id = await signal(db, "EXIT", "short", lots=5)
    assert await executor.execute(exit_id) == "executed"
    assert await paper_position(db) == 0
    assert await ledger(db) == (None, 0)


async def test_a_partial_exit_closes_the_oldest_lots_first(db, executor_for):
    executor = await executor_for()
    for kind, lots in (("BASE_ENTRY", 2), ("PYRAMID", 3)):
        await executor.execute(await signal(db, kind, "long", lots=lots))
    await executor.execute(await signal(db, "EXIT", "long", lots=3))
    cur = await db.execute("select position, lots, status from gateway.positions order by id")
    assert await cur.fetchall() == [
        ("long_BASE_ENTRY", 2, "closed"), ("long_PYRAMID", 2, "open"),
        ("long_PYRAMID", 1, "closed"),
    ]  # fmt: skip
    assert await ledger(db) == ("long", 2)


@pytest.mark.parametrize("side", ["long", "short"])
async def test_an_entry_against_the_other_open_side_is_refused_with_an_alert(
    db, executor_for, side
):
    executor = await executor_for()
    other = "short" if side == "long" else "long"
    await executor.execute(await signal(db, "BASE_ENTRY", other))
    entry = await signal(db, "BASE_ENTRY", side)
    assert await executor.execute(entry) == "rejected"
    _status, detail = await status_of(db, entry)
    assert f"a {other} position of 1 lots is open: exit it before a {side} entry" in detail
    assert "signal_rejected" in await alerts(db, entry)
    assert await paper_position(db) == (1 if other == "long" else -1)


@pytest.mark.parametrize("side", ["long", "short"])
async def test_a_pyramid_with_nothing_open_on_its_side_is_refused(db, executor_for, side):
    executor = await executor_for()
    pyramid = await signal(db, "PYRAMID", side)
    assert await executor.execute(pyramid) == "rejected"
    assert "nothing open" in (await status_of(db, pyramid))[1]
    assert await paper_position(db) == 0


async def test_a_reversal_reaching_the_leader_entry_first_executes_exit_then_entry(
    db, executor_for
):
    """The two alerts of a reversal fire in the same second; the entry arrives first
    (from another instance) and waits for the exit instead of being refused."""
    executor = await executor_for(reorder_window=30.0)  # generous: a loaded machine
    await executor.execute(await signal(db, "BASE_ENTRY", "long", lots=2, at="10 s"))
    entry = await signal(db, "BASE_ENTRY", "short", lots=1, received="0 s")
    assert await executor.execute(entry) == "pending"  # deferred: within the window
    exit_ = await signal(db, "EXIT", "long", lots=0, received="0 s")
    assert await executor.execute(exit_) == "executed"
    executor.enqueue([entry])
    await executor.drain(5)
    assert (await status_of(db, entry))[0] == "executed"
    assert await paper_position(db) == -1
    cur = await db.execute(
        "select s.type, o.start_position, o.target_position from gateway.orders o"
        " join gateway.signals s on s.id = o.signal_id order by o.id"
    )
    assert await cur.fetchall() == [("BASE_ENTRY", 0, 2), ("EXIT", 2, 0), ("BASE_ENTRY", 0, -1)]


async def test_signals_of_one_second_go_exit_then_entry_then_pyramid(db, executor_for):
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "long", lots=1, at="10 s"))
    pyramid = await signal(db, "PYRAMID", "short", lots=1)
    entry = await signal(db, "BASE_ENTRY", "short", lots=2)
    exit_ = await signal(db, "EXIT", "long")
    # All three in one batch, the pyramid asked for first.
    assert (
        await asyncio.gather(*(executor.execute(s) for s in (pyramid, entry, exit_)))
        == ["executed"] * 3
    )
    cur = await db.execute("select signal_id from gateway.orders order by id offset 1")
    assert [r[0] for r in await cur.fetchall()] == [exit_, entry, pyramid]
    assert await paper_position(db) == -3


async def test_a_deferred_entry_is_refused_once_its_window_has_passed(db, executor_for):
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "long"))
    entry = await signal(db, "BASE_ENTRY", "short", received="0 s")
    assert await executor.execute(entry) == "pending"
    await db.execute(
        "update gateway.signals set received_at = now() - interval '1 min' where id = %s", [entry]
    )
    assert await executor.execute(entry) == "rejected"


@pytest.mark.parametrize("side", ["long", "short"])
async def test_an_entry_that_arrives_after_its_exit_was_acted_on_is_refused(db, executor_for, side):
    """Entry at t-20 s spooled on an instance whose database was away; its exit (t-5 s)
    reached another instance and was refused (nothing open). The entry, replayed late,
    must not open what the strategy has already closed."""
    executor = await executor_for()
    exit_ = await signal(db, "EXIT", side, lots=0, at="5 s", received="1 s")
    assert await executor.execute(exit_) == "rejected"
    entry = await signal(db, "BASE_ENTRY", side, lots=2, at="20 s", received="0 s")
    assert await executor.execute(entry) == "rejected"
    _status, detail = await status_of(db, entry)
    assert f"signal {exit_}, an exit of the {side} side" in detail, detail
    assert "came after this entry and was acted on first" in detail, detail
    assert "signal_rejected" in await alerts(db, entry)
    assert await paper_position(db) == 0 and await ledger(db) == (None, 0)
    # The other side, and a later entry of this side, are not held to that exit.
    other = "short" if side == "long" else "long"
    assert await executor.execute(await signal(db, "BASE_ENTRY", other, at="20 s")) == "executed"
    assert await executor.execute(await signal(db, "EXIT", other, at="4 s")) == "executed"
    assert await executor.execute(await signal(db, "BASE_ENTRY", side, at="3 s")) == "executed"
    assert await ledger(db) == (side, 1)


async def test_a_late_pyramid_after_a_partial_exit_still_adds(db, executor_for):
    """A partial exit leaves the side open: a pyramid signalled before it, replayed
    after it, belongs to that position (the strategy holds 2 + 1 - 1)."""
    executor = await executor_for()
    assert await executor.execute(await signal(db, "BASE_ENTRY", "long", lots=2, at="30 s")) == (
        "executed"
    )
    assert await executor.execute(await signal(db, "EXIT", "long", lots=1, at="5 s")) == "executed"
    late = await signal(db, "PYRAMID", "long", lots=1, at="20 s", received="0 s")
    assert await executor.execute(late) == "executed", await status_of(db, late)
    assert await ledger(db) == ("long", 2) and await paper_position(db) == 2


async def test_an_exit_then_an_entry_of_one_second_is_no_late_entry(db, executor_for):
    """Within a second the exit goes first (signal_rank): an entry of that second is new."""
    executor = await executor_for()
    assert await executor.execute(await signal(db, "BASE_ENTRY", "long", at="10 s")) == "executed"
    assert await executor.execute(await signal(db, "EXIT", "long")) == "executed"
    assert await executor.execute(await signal(db, "BASE_ENTRY", "long")) == "executed"
    assert await ledger(db) == ("long", 1)


async def test_an_entry_beyond_max_lots_is_refused_and_lot_size_scales_the_target(db, executor_for):
    from service.brokers.base import Instrument

    executor = await executor_for(
        instruments={"NIFTY": Instrument("NIFTY", "NFO", "NIFTY29DEC26FUT", "NRML", 75, 3)}
    )
    assert await executor.execute(await signal(db, "BASE_ENTRY", "short", lots=2)) == "executed"
    too_many = await signal(db, "PYRAMID", "short", lots=2)
    assert await executor.execute(too_many) == "rejected"
    assert "it would hold 4 lots, above max_lots 3" in (await status_of(db, too_many))[1]
    assert await paper_position(db) == -150
    cur = await db.execute("select target_position, symbol from gateway.orders order by id")
    assert (await cur.fetchall())[0] == (-150, "NFO:NIFTY29DEC26FUT:NRML")


async def test_an_instrument_the_leader_cannot_map_is_refused_with_an_alert(db, executor_for):
    from service.brokers.base import Instrument

    executor = await executor_for(instruments={"NIFTY": Instrument("NIFTY", "NFO", "N", "NRML")})
    other = await signal(db, "BASE_ENTRY", "long", instrument="BANKNIFTY")
    assert await executor.execute(other) == "rejected"
    assert "not in the leader's instruments file" in (await status_of(db, other))[1]
    assert "signal_rejected" in await alerts(db, other)


async def test_sending_the_same_target_twice_leaves_the_position_where_it_is(db, executor_for):
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "short", lots=2))
    await db.execute("select gateway.order_action(-2, -2)")
    order = executor.instrument("NIFTY")
    from datetime import UTC, datetime, timedelta

    from service.brokers.base import OrderRequest

    again = OrderRequest("again", order, "BUY", -2, -2, None, 1, "t",
                         datetime.now(UTC) + timedelta(seconds=5))  # fmt: skip
    (answer,) = await executor.broker.place_many([again])
    assert answer.status == "matched"
    assert await paper_position(db) == -2


# --- the broker holds what the ledger does not ------------------------------------


async def test_a_position_changed_at_the_broker_is_not_traded_over(db, executor_for):
    """A manual trade at the broker: the next target order would take it over, so
    nothing is sent, the signal is in doubt and a human is paged."""
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "long", lots=2))
    await db.execute(  # someone bought 5 more by hand
        "insert into gateway.paper_broker_requests (client_order_id, instrument, action,"
        " quantity) values ('manual', 'NIFTY', 'BUY', 5)"
    )
    exit_ = await signal(db, "EXIT", "long")
    assert await executor.execute(exit_) == "in_doubt"
    _status, detail = await status_of(db, exit_)
    assert "the broker holds 7 of NIFTY, the ledger 2" in detail
    assert "signal_in_doubt" in await alerts(db, exit_)
    assert await paper_position(db) == 7  # nothing sent
    cur = await db.execute("select outcome from gateway.orders where signal_id = %s", [exit_])
    assert await cur.fetchone() == ("not_sent",)


# --- the kill switch --------------------------------------------------------------


async def halt(db, mode: str) -> None:
    await db.execute("select gateway.set_trading_halt(%s, 'test', 'tester')", [mode])


async def test_halted_trading_sends_nothing_and_resumes_where_it_stopped(db, executor_for):
    executor = await executor_for()
    await halt(db, "halted")
    entry = await signal(db, "BASE_ENTRY", "long")
    assert await executor.execute(entry) == "pending"
    assert await paper_position(db) == 0
    cur = await db.execute("select kind from gateway.alerts order by id")
    assert [r[0] for r in await cur.fetchall()] == ["trading_halted"]
    await halt(db, "running")
    assert await executor.execute(entry) == "executed"


async def test_halt_entries_only_still_lets_exits_out(db, executor_for):
    executor = await executor_for()
    await executor.execute(await signal(db, "BASE_ENTRY", "short", lots=2, at="20 s"))
    await halt(db, "entries_only")
    pyramid = await signal(db, "PYRAMID", "short", at="10 s")
    exit_ = await signal(db, "EXIT", "short", lots=0)
    assert await executor.execute(pyramid) == "pending"
    assert await executor.execute(exit_) == "executed"  # behind a held entry, yet out
    assert await paper_position(db) == 0
    await halt(db, "running")
    # The pyramid now has nothing to add to: refused, never opened by itself.
    assert await executor.execute(pyramid) == "rejected"


async def test_a_signal_held_by_the_halt_expires_by_its_max_age(db, executor_for):
    executor = await executor_for()
    await halt(db, "halted")
    old = await signal(db, "BASE_ENTRY", "long", at="1 hour")
    assert await executor.execute(old) == "expired"
    await halt(db, "running")
    assert await paper_position(db) == 0


async def test_halt_action_reject_refuses_new_signals(db, executor_for):
    executor = await executor_for(halt_action="reject")
    await halt(db, "halted")
    entry = await signal(db, "BASE_ENTRY", "long")
    assert await executor.execute(entry) == "rejected"
    assert "trading is halted" in (await status_of(db, entry))[1]
