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


# A batch mixing every kind of signal, for two copies of the same book: one run by
# the batch functions, one by the per-signal functions in the input order.
_MIXED = [  # (type, instrument, position, lots, age, broker's outcome)
    ("BASE_ENTRY", "X", "Long_1", 2, "0 s", "filled"),
    ("PYRAMID", "X", "Long_2", 1, "0 s", "filled"),
    ("BASE_ENTRY", "Y", "Long_1", 3, "0 s", "filled"),
    ("EXIT", "X", "Exit_all", 0, "0 s", "filled"),  # every open lot: those before the batch
    ("BASE_ENTRY", "Y", "Long_2", 1, "0 s", "filled"),
    ("BASE_ENTRY", "Z", "Long_1", 1, "2 h", "filled"),  # too old: expired
    ("EXIT", "W", "Exit_all", 0, "0 s", "filled"),  # nothing open: rejected
    ("BASE_ENTRY", "V", "Long_1", 1, "0 s", "rejected"),  # the broker says no
    ("EXIT", "U", "Exit_1", 1, "0 s", "filled"),  # an exit that names its lots
    ("BASE_ENTRY", "X", "Long_3", 1, "0 s", "filled"),  # after the exit: stays open
]


async def _mixed_book(db, prefix: str) -> list[int]:
    """An open X position from before, then the batch's signals, pending; their ids."""
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by, status, claimed_epoch)"
        " values (%s, 'BASE_ENTRY', %s, 'Long_0', 4, 99, now(), '{}', 't', 'executed', 1)"
        " returning id",
        [f"{prefix}old", f"{prefix}X"],
    )
    (old,) = await cur.fetchone()
    await db.execute(
        "insert into gateway.positions (instrument, position, signal_id, is_base_position,"
        " lots, entry_price, entry_at) values (%s, 'Long_0', %s, true, 4, 99, now() - '1 h'::interval)",
        [f"{prefix}X", old],
    )
    ids = []
    for i, (kind, instrument, position, lots, age, _) in enumerate(_MIXED):
        cur = await db.execute(
            "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
            " signal_at, payload, received_by) values (%s, %s, %s, %s, %s, 100,"
            " now() - %s::interval, '{}', 't') returning id",
            [f"{prefix}{i}", kind, f"{prefix}{instrument}", position, lots, age],
        )
        ids.append((await cur.fetchone())[0])
    return ids


async def _book_state(db, prefix: str) -> dict[str, list[tuple]]:
    n = len(prefix) + 1
    queries = {
        "signals": "select substr(instrument, %(n)s), position, status,"
        " regexp_replace(detail, 'signal time [^a-z]* is', 'signal time is'), claimed_epoch"
        " from gateway.signals where instrument like %(p)s order by fingerprint",
        "orders": "select substr(s.instrument, %(n)s), s.position, o.action, o.quantity,"
        " o.outcome, o.broker_order_id is not null, o.epoch,"
        " regexp_replace(o.client_order_id, '-\\d+-', '-')"
        " from gateway.orders o join gateway.signals s on s.id = o.signal_id"
        " where s.instrument like %(p)s order by s.fingerprint",
        "positions": "select substr(p.instrument, %(n)s), p.position, p.lots, p.status,"
        " p.is_base_position, b.position, x.position from gateway.positions p"
        " left join gateway.positions b on b.id = p.base_position_id"
        " left join gateway.signals x on x.id = p.exit_signal_id"
        " where p.instrument like %(p)s order by p.instrument, p.position",
        "alerts": "select a.kind, replace(a.detail, %(prefix)s, '') from gateway.alerts a"
        " join gateway.signals s on s.id = a.signal_id where s.instrument like %(p)s"
        " order by s.fingerprint, a.kind",
    }
    state = {}
    for name, sql in queries.items():
        cur = await db.execute(sql, {"n": n, "p": f"{prefix}%", "prefix": prefix})
        state[name] = await cur.fetchall()
    return state


async def test_a_mixed_batch_ends_exactly_as_the_same_signals_one_by_one(db):
    await db.execute("insert into pgleader.election (name, epoch) values ('gateway', 7)")
    batch_ids = await _mixed_book(db, "b_")
    single_ids = await _mixed_book(db, "s_")
    args = (7, "gw1", "paper", "1 h")

    cur = await db.execute(
        "select signal_id, acted, status, client_order_id is not null"
        " from gateway.claim_signals('gateway', %s, %s, %s, %s, %s)",
        [7, batch_ids, *args[1:]],
    )
    claimed = await cur.fetchall()
    singles = []
    for sid in single_ids:
        cur = await db.execute(
            "select status, client_order_id is not null from gateway.claim_signal(%s, %s, %s, %s, %s)",
            [sid, *args],
        )
        row = await cur.fetchone()
        singles.append((True, *row) if row else (False, None, False))
    # Same answer per signal, in the order given.
    assert [r[0] for r in claimed] == batch_ids
    assert [r[1:] for r in claimed] == singles
    assert [r[2] for r in claimed] == [
        "executing", "executing", "executing", "executing", "executing",
        "expired", "rejected", "executing", "executing", "executing",
    ]  # fmt: skip

    outcomes = {f"{i}": outcome for i, (*_, outcome) in enumerate(_MIXED)}

    async def coids(ids: list[int]) -> tuple[list[str], list[str]]:
        cur = await db.execute(
            "select o.client_order_id, substr(s.fingerprint, 3) from gateway.orders o"
            " join gateway.signals s on s.id = o.signal_id"
            " where o.signal_id = any(%s) order by array_position(%s, o.signal_id)",
            [ids, ids],
        )
        rows = await cur.fetchall()
        return [r[0] for r in rows], [outcomes[r[1]] for r in rows]

    batch_coids, batch_outcomes = await coids(batch_ids)
    cur = await db.execute(
        "select client_order_id, status from gateway.complete_orders(%s, %s, %s, %s)",
        [batch_coids, batch_outcomes, [f"B{c}" for c in batch_coids], ["ok"] * len(batch_coids)],
    )
    recorded = await cur.fetchall()
    assert [r[0] for r in recorded] == batch_coids
    single_coids, single_outcomes = await coids(single_ids)
    single_recorded = []
    for coid, outcome in zip(single_coids, single_outcomes, strict=True):
        cur = await db.execute(
            "select gateway.complete_order(%s, %s, %s, 'ok')", [coid, outcome, f"B{coid}"]
        )
        single_recorded.append((await cur.fetchone())[0])
    assert [r[1] for r in recorded] == single_recorded
    assert "failed" in single_recorded and "executed" in single_recorded

    batch_state, single_state = await _book_state(db, "b_"), await _book_state(db, "s_")
    assert batch_state == single_state
    # The exit closed what was open when it was claimed and what the batch opened before it.
    assert ("X", "Long_0", 4, "closed", True, None, "Exit_all") in batch_state["positions"]
    assert [p[3] for p in batch_state["positions"] if p[0] == "Y"] == ["open", "open"]
    assert ("X", "Long_3", 1, "open", True, None, None) in batch_state["positions"]
    # Recording again changes nothing (idempotent), by either path.
    cur = await db.execute(
        "select status from gateway.complete_orders(%s, %s, %s, %s)",
        [batch_coids, batch_outcomes, [f"B{c}" for c in batch_coids], ["ok"] * len(batch_coids)],
    )
    assert [r[0] for r in await cur.fetchall()] == [r[1] for r in recorded]
    assert await _book_state(db, "b_") == batch_state


async def test_an_unknown_client_order_id_is_recorded_as_nothing(db):
    # Both paths: one order alone (per row) and among others (the set-based pass).
    await db.execute("insert into pgleader.election (name, epoch) values ('gateway', 3)")
    ids = await store_pending(db, 3)
    cur = await db.execute(
        "select client_order_id from gateway.claim_signals('gateway', 3, %s, 't', 'paper', '1 h')",
        [ids],
    )
    coids = [r[0] for r in await cur.fetchall()]
    for outcome in ("filled", "rejected"):
        cur = await db.execute(
            "select gateway.complete_order('pgl-nobody', %s, 'B1', 'x')", [outcome]
        )
        assert await cur.fetchone() == (None,)
    batch = [coids[0], "pgl-nobody", coids[1], coids[2]]
    cur = await db.execute(
        "select client_order_id, status from gateway.complete_orders(%s, %s, %s, %s)",
        [batch, ["filled"] * 4, ["B"] * 4, ["ok"] * 4],
    )
    assert await cur.fetchall() == [
        (coids[0], "executed"), ("pgl-nobody", None), (coids[1], "executed"),
        (coids[2], "executed"),
    ]  # fmt: skip
    cur = await db.execute("select count(*) from gateway.alerts")
    assert await cur.fetchone() == (0,)
    cur = await db.execute("select count(*) from gateway.positions")
    assert await cur.fetchone() == (3,)
