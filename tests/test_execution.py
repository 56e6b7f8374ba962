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
    ids = await store_pending(db, 300)
    statuses = await asyncio.gather(*(executor.execute(sid) for sid in ids))
    assert statuses == ["executed"] * len(ids)
    cur = await db.execute(
        "select count(*), count(distinct client_order_id) from gateway.paper_broker_requests"
    )
    assert await cur.fetchone() == (300, 300)
    cur = await db.execute("select count(*) from gateway.positions")
    assert await cur.fetchone() == (300,)
    # Far fewer batches than signals: what arrived while one was in flight went together.
    stats = executor.batch_stats
    assert stats["signals"] == 300 and stats["batches"] < 100 and stats["largest"] > 1


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
                "select * from gateway.claim_signals('gateway', %s, %s, 'x', 'paper', '1 h')",
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
