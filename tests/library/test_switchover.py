"""Leadership on purpose, against a real PostgreSQL: a switchover to a named
instance, instances that may not lead, and priorities that decide a failover."""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from pgleader import Elector, Timings, TransferRefused
from tests.support.gateway import pgleader_cli

FAST = Timings(heartbeat=0.2, lease=0.6, evict_after=1.2)


@pytest.fixture
async def elector(dsn: str) -> AsyncIterator[Callable[..., Any]]:
    """elector(id, **options) -> a started Elector of election 'main'; all stopped at the end."""
    started: list[Elector] = []

    async def make(instance_id: str, **kwargs: Any) -> Elector:
        kwargs.setdefault("timings", FAST)
        kwargs.setdefault("resign_cooldown", 0.05)
        e = Elector(dsn, "main", instance_id=instance_id, **kwargs)
        await e.start()
        started.append(e)
        return e

    yield make
    await asyncio.gather(*(e.stop() for e in started))


def elections(*electors: Elector) -> list[tuple[str, float]]:
    """(instance, time.monotonic()) of every `elected` of these electors, as they come."""
    seen: list[tuple[str, float]] = []
    for e in electors:
        e.on_transition(
            lambda t, e=e: t.kind == "elected" and seen.append((e.instance_id, time.monotonic()))
        )
    return seen


async def poll(condition: Callable[[], Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def live_follower(db: psycopg.AsyncConnection[Any], e: Elector) -> None:
    """Wait until `e` follows on its session of now: a follower's beat since this call
    (the row of a session it just dropped still looks alive for a moment), its
    election session connected, not leading."""
    beats = e.stats["heartbeats_ok"]

    async def live() -> bool:
        if e.is_leader or e.stats["heartbeats_ok"] <= beats:
            return False
        cur = await db.execute(
            "select exists (select from pgleader.instances i join pg_stat_activity a"
            " on a.pid = i.backend_pid where i.election = 'main' and i.instance_id = %s"
            " and not i.is_leader and i.last_heartbeat > now() - interval '1 s')",
            [e.instance_id],
        )
        row = await cur.fetchone()
        return bool(row and row[0]) and not e.is_leader

    await poll(live)


async def history(db: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
    cur = await db.execute(
        "select epoch, instance_id, release_reason from pgleader.leadership_history"
        " where election = 'main' order by epoch"
    )
    return await cur.fetchall()


async def test_a_transfer_elects_the_named_follower_never_another(elector, db):
    a = await elector("a")
    await a.wait_for_leadership(10)
    b, c = await elector("b"), await elector("c")
    group = {e.instance_id: e for e in (a, b, c)}
    seen = elections(a, b, c)
    took = []
    leader = a
    for round_ in range(10):
        target = group["bca"[round_ % 3]]
        await live_follower(db, target)
        before = len(seen)
        asked = time.monotonic()
        await leader.transfer(target.instance_id)
        await target.wait_for_leadership(5)
        assert seen[before:] == [(target.instance_id, seen[before][1])], seen[before:]
        took.append(seen[before][1] - asked)
        leader = target
    rows = await history(db)
    assert [r[0] for r in rows] == list(range(1, 12))
    assert [r[2] for r in rows[:-1]] == [f"transfer to {r[1]}" for r in rows[1:]]
    cur = await db.execute("select transfer_to, transfer_until from pgleader.election")
    assert await cur.fetchone() == (None, None)  # the target's election ends the switchover
    print(f"transfer request -> target elected: median {statistics.median(took) * 1000:.1f} ms,"
          f" max {max(took) * 1000:.1f} ms over {len(took)}")  # fmt: skip


async def test_a_transfer_to_a_dead_unknown_or_ineligible_instance_is_refused(elector, db):
    a = await elector("a")
    epoch = await a.wait_for_leadership(10)
    gone = await elector("gone")
    await live_follower(db, gone)
    await gone.stop()
    await poll(lambda: _session_gone(db, "gone"))
    await elector("watcher", eligible=False)
    await poll(lambda: _registered(db, "watcher"))
    for to, reason in [
        ("nobody", "no instance nobody in election main"),
        ("gone", "instance gone is not alive"),
        ("watcher", "instance watcher may not lead (it runs with --no-lead)"),
        ("a", "instance 'a' already leads"),
    ]:
        with pytest.raises(TransferRefused, match=re.escape(reason)):
            await a.transfer(to)
    assert a.is_leader and a.epoch == epoch
    cur = await db.execute("select epoch, leader, transfer_to from pgleader.leader")
    assert await cur.fetchone() == (epoch, "a", None)


async def _session_gone(db: psycopg.AsyncConnection[Any], instance: str) -> bool:
    cur = await db.execute(
        "select not exists (select from pgleader.instances i join pg_stat_activity a"
        " on a.pid = i.backend_pid where i.instance_id = %s)",
        [instance],
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _registered(db: psycopg.AsyncConnection[Any], instance: str) -> bool:
    cur = await db.execute(
        "select exists (select from pgleader.instances where instance_id = %s"
        " and last_heartbeat > started_at)",
        [instance],
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def test_pgleader_transfer_works_through_the_database_alone(elector, db, dsn):
    a = await elector("a")
    await a.wait_for_leadership(10)
    b = await elector("b")
    await live_follower(db, b)
    code, out, err = await pgleader_cli("transfer", "--to", "nobody", "--dsn", dsn,
                                        "--election", "main")  # fmt: skip
    assert code == 1 and err.strip() == (
        "pgleader transfer: refused: no instance nobody in election main"
    ), err
    assert a.is_leader
    code, out, err = await pgleader_cli("transfer", "--to", "b", "--dsn", dsn, "--election", "main")
    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    assert (answer["leader"], answer["epoch"]) == ("b", 2)
    assert await b.wait_for_leadership(5) == 2 and not a.is_leader
    assert (await history(db))[0] == (1, "a", "transfer to b")


async def test_a_target_that_dies_mid_transfer_leaves_the_lead_to_another_after_the_bound(
    elector, db
):
    victim: dict[str, Elector] = {}

    async def kill_the_target() -> None:  # the leader's in-flight work ends: the target dies
        await victim["b"].stop()

    a = await elector("a", before_transfer=kill_the_target)
    await a.wait_for_leadership(10)
    victim["b"] = b = await elector("b")
    c = await elector("c")
    await live_follower(db, b)
    await live_follower(db, c)
    seen = elections(a, b, c)
    bound = 1.0
    asked = time.monotonic()
    await a.transfer("b", bound=bound)
    while not seen:  # never leaderless for longer than the bound (and a hold-back)
        assert time.monotonic() - asked < bound + 2.0, "nobody leads after the bound"
        await asyncio.sleep(0.02)
    (winner, at), *_ = seen
    assert winner in ("a", "c") and at - asked >= bound * 0.9, seen
    rows = await history(db)
    assert [(r[0], r[1]) for r in rows] == [(1, "a"), (2, winner)]
    assert rows[0][2] == "transfer to b"


async def test_a_no_lead_instance_never_leads_even_alone(elector, db):
    a = await elector("a")
    await a.wait_for_leadership(10)
    n = await elector("n", eligible=False)
    await poll(lambda: _registered(db, "n"))
    await a.stop()  # resigns: n is the only instance left
    beats = n.stats["heartbeats_ok"]

    async def kept_beating() -> bool:  # well past evict-after: any follower would lead by now
        return n.stats["heartbeats_ok"] >= beats + 8

    await poll(kept_beating)
    assert not n.is_leader and n.stats["elected"] == 0
    cur = await db.execute(
        "select v.leader, i.eligible, i.is_leader, now() - i.last_heartbeat < interval '1 s'"
        " from pgleader.leader v join pgleader.instances i on i.instance_id = 'n'"
    )
    assert await cur.fetchone() == (None, False, False, True)
    cur = await db.execute(
        "select count(*) from pg_locks l join pgleader.instances i on i.backend_pid = l.pid"
        " where l.locktype = 'advisory' and i.instance_id = 'n'"
    )
    assert await cur.fetchone() == (0,), "an instance that may not lead waited on the lock"


async def test_the_higher_priority_follower_wins_after_the_leader_is_killed(elector, db):
    low1 = await elector("low1", priority=0)
    await low1.wait_for_leadership(10)
    high = await elector("high", priority=10)
    low2 = await elector("low2", priority=0)
    lows = [low1, low2]
    for low in lows:
        # Preference, not the width of its window, is the point: two heartbeats (0.4 s
        # here) were once not enough for `high` to ask for the lock on a loaded CI run.
        low.hold_back = 2.0
    await live_follower(db, low2)
    for round_ in range(4):
        leader = next(e for e in lows if e.is_leader)
        await live_follower(db, high)
        cur = await db.execute("select backend_pid from pgleader.leader")
        (pid,) = await cur.fetchone() or (None,)
        await db.execute("select pg_terminate_backend(%s)", [pid])
        try:
            await high.wait_for_leadership(15)  # generous: which wins is the point
        except TimeoutError:  # say where each one was
            cur = await db.execute(
                "select a.pid, a.state, a.wait_event_type, a.wait_event, left(a.query, 60),"
                " l.granted from pg_stat_activity a left join pg_locks l"
                " on l.pid = a.pid and l.locktype = 'advisory' where a.backend_type = 'client backend'"
            )
            states = {e.instance_id: (e.is_leader, dict(e.stats)) for e in (low1, high, low2)}
            raise AssertionError(f"round {round_}: {states}\n{await cur.fetchall()}") from None
        assert not any(e.is_leader for e in lows), round_
        # back to a low-priority leader for the next round: a switchover to the other one
        target = next(e for e in lows if e is not leader)
        await live_follower(db, target)
        await high.transfer(target.instance_id)
        await target.wait_for_leadership(15)
    cur = await db.execute(
        "select instance_id, priority from pgleader.instances order by instance_id"
    )
    assert await cur.fetchall() == [("high", 10), ("low1", 0), ("low2", 0)]
