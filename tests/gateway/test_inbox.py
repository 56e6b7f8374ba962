"""The inbox's group commit, in process, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool

from service.intake.inbox import Inbox, Incoming, parse_notification, store_signals
from service.intake.signals import fingerprint, parse_body, parse_dict


def incoming(position: str, *, notify: bool = True, at: datetime | None = None) -> Incoming:
    """A signal stamped `at` (now by default): the fingerprint has the second in it, so
    the same signal made twice must share its `at` or a second may pass between."""
    now = at or datetime.now(UTC)
    body = {"type": "base_entry", "instrument": "NIFTY", "position": position, "lots": 1,
            "price": 100.5, "timestamp": now.isoformat()}  # fmt: skip
    signal = parse_dict(body, now=now, max_future_skew=timedelta(seconds=5)).signal
    return Incoming(signal, fingerprint(signal), notify=notify)


async def test_one_write_stores_new_signals_once_and_notifies_only_those_asked(db, dsn):
    at = datetime.now(UTC)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        (old,) = await store_signals(conn, [incoming("Long_0", at=at)], "gw1")
        assert not old.duplicate
        await db.execute("listen gateway_signals")
        items = [
            incoming("Long_1", at=at),
            incoming("Long_0", at=at),  # stored before
            incoming("Long_2", notify=False, at=at),  # the leader's own: no NOTIFY
            incoming("Long_1", at=at),  # twice in the same write
            incoming("Long_3", at=at),
        ]
        stored = await store_signals(conn, items, "gw1")
        await conn.execute("notify gateway_signals, 'end'")  # delivered in commit order
    assert [s.duplicate for s in stored] == [False, True, False, True, False]
    assert stored[1].signal_id == old.signal_id and stored[3].signal_id == stored[0].signal_id
    cur = await db.execute("select count(*), count(distinct fingerprint) from gateway.signals")
    assert await cur.fetchone() == (4, 4)
    # One notification for the write, naming the new signals that asked for one.
    heard = []
    async for note in db.notifies(timeout=15):
        if note.payload == "end":
            break
        heard.append(parse_notification(note.payload))
    assert heard == [sorted([stored[0].signal_id, stored[4].signal_id])]


async def test_concurrent_stores_share_writes_and_each_signal_is_stored_once(db, dsn):
    async with AsyncConnectionPool(dsn, min_size=2, kwargs={"autocommit": True}) as pool:
        inbox = Inbox(pool, "gw1")
        items = [incoming(f"Long_{i}") for i in range(200)]
        twice = items + items[:50]  # the same signals again, at the same moment
        stored = await asyncio.gather(*(inbox.store(i.signal, i.fingerprint) for i in twice))
        await inbox.close()
    first, again = stored[:200], stored[200:]
    assert not any(s.duplicate for s in first)
    assert all(s.duplicate for s in again)
    assert [s.signal_id for s in again] == [s.signal_id for s in first[:50]]
    cur = await db.execute("select count(*) from gateway.signals")
    assert await cur.fetchone() == (200,)
    # What arrived while a write was in flight went in the next one.
    assert inbox.stats["signals"] == 250 and inbox.stats["writes"] < 50


async def test_a_failed_write_fails_every_waiter_and_stores_nothing(db, dsn):
    async with AsyncConnectionPool(dsn, min_size=1, kwargs={"autocommit": True}) as pool:
        inbox = Inbox(pool, "x" * 10)
        await db.execute(
            "alter table gateway.signals add constraint no_gw check (received_by <> 'xxxxxxxxxx')"
        )
        items = [incoming(f"Long_{i}") for i in range(5)]
        results = await asyncio.gather(
            *(inbox.store(i.signal, i.fingerprint) for i in items), return_exceptions=True
        )
    assert all(isinstance(r, psycopg.errors.CheckViolation) for r in results), results
    cur = await db.execute("select count(*) from gateway.signals")
    assert await cur.fetchone() == (0,)


def test_a_garbled_notification_names_no_signal():
    assert parse_notification("12,13") == [12, 13]
    assert parse_notification("12,x") == []


async def test_a_write_keeps_every_digit_and_microsecond(db, dsn):
    now = datetime.now(UTC).replace(microsecond=123456)
    body = {"type": "base_entry", "instrument": "NIFTY", "position": "Long_1", "lots": 3,
            "price": 52000.123456789012345, "stop": 1e-7, "timestamp": now.isoformat(),
            "note": {"deep": [1, 2.50, "x"]}}  # fmt: skip
    # More digits than a float holds: they must survive as they came.
    raw = json.dumps(body).replace("52000.12345678901", "52000.123456789012345678").encode()
    signal = parse_body(raw, now=now, max_future_skew=timedelta(seconds=5)).signal
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        (stored,) = await store_signals(conn, [Incoming(signal, fingerprint(signal))], "gw1")
    cur = await db.execute(
        "select price, stop, signal_at, lots, payload from gateway.signals where id = %s",
        [stored.signal_id],
    )
    price, stop, signal_at, lots, payload = await cur.fetchone()
    assert (price, stop, signal_at, lots) == (signal.price, signal.stop, signal.timestamp, 3)
    assert payload == signal.payload()
    assert str(price) == "52000.123456789012345678"
