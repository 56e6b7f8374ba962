"""Electors in real child processes: SIGKILL and SIGSTOP the leader."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from pgleader import Fenced, check_epoch
from pgleader.demo import ElectorProcess, Timeline
from pgleader.events import describe_event
from tests.support.gateway import until

FAST = ["--heartbeat", "0.2", "--lease", "0.6", "--evict-after", "1.2"]


@pytest.fixture
async def spawn(dsn: str) -> AsyncIterator[Callable[..., Any]]:
    procs: list[ElectorProcess] = []
    lines = Timeline()

    async def make(n: int) -> tuple[dict[str, ElectorProcess], Timeline]:
        for _ in range(n):
            p = ElectorProcess(dsn, "main", f"proc-{len(procs)}", *FAST)
            await p.start(lines)
            procs.append(p)
        return {p.instance_id: p for p in procs}, lines

    yield make
    await asyncio.gather(*(p.stop() for p in procs))


async def test_sigkilled_leader_process_is_replaced_well_under_a_second(spawn, db):
    procs, lines = await spawn(3)
    for name in procs:  # every elector is up (followers then wait on the lock)
        await lines.wait(event="started", instance=name)
    seen, _, first = await lines.wait(event="elected")
    killed_at = time.monotonic()
    procs[first["instance"]].signal(signal.SIGKILL)
    _, at, second = await lines.wait(since=seen + 1, event="elected")
    assert second["instance"] != first["instance"]
    assert second["epoch"] == first["epoch"] + 1
    assert at - killed_at < 1.0, f"takeover took {at - killed_at:.3f} s"  # real figure: bench/
    cur = await db.execute(
        "select release_reason from pgleader.leadership_history where epoch = %s", [first["epoch"]]
    )
    assert await cur.fetchone() == ("session_ended",)


async def test_hung_leader_is_evicted_and_fenced_and_demotes_itself_on_resume(spawn, db):
    procs, lines = await spawn(2)
    seen, _, first = await lines.wait(event="elected")
    old = procs[first["instance"]]
    await lines.wait(event="acting", instance=old.instance_id)
    old.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    seen, at, second = await lines.wait(since=seen + 1, event="elected")
    assert second["instance"] != old.instance_id and second["epoch"] == first["epoch"] + 1
    assert at - stopped_at >= 1.2 - 0.05, "evicted before evict_after"
    cur = await db.execute(
        "select release_reason from pgleader.leadership_history where epoch = %s", [first["epoch"]]
    )
    assert await cur.fetchone() == ("evicted",)

    old.signal(signal.SIGCONT)
    resumed = len(lines.lines)
    _, _, demoted = await lines.wait(since=seen, event="demoted", instance=old.instance_id)
    assert demoted["epoch"] == first["epoch"]
    async with await psycopg.AsyncConnection.connect(db.info.dsn, autocommit=True) as conn:
        async with conn.transaction():
            with pytest.raises(Fenced):
                await check_epoch(conn, "main", first["epoch"])
    # the resumed process never acted under its old epoch again
    for _, line in lines.lines[resumed:]:
        acted_again = line["event"] == "acting" and line.get("epoch") == first["epoch"]
        assert not (line["instance"] == old.instance_id and acted_again), line


async def _on_the_lock(db: Any, instance: str, granted: bool, timeout: float) -> None:
    """Until `instance`'s election session waits on the lock (granted False) or holds it."""
    query = (
        "select exists (select from pg_locks l join pgleader.instances i on l.pid = i.backend_pid"
        " where i.election = 'main' and i.instance_id = %s and l.locktype = 'advisory'"
        " and l.objsubid = 2 and l.granted = %s)"
    )

    async def there() -> bool:
        return bool((await (await db.execute(query, [instance, granted])).fetchone())[0])

    await until(there, timeout)


async def test_a_waiter_paused_with_the_lock_granted_is_evicted_and_another_leads(spawn, dsn, db):
    """The leader dies while a follower's process is paused (SIGSTOP, a frozen VM) with
    its lock wait in flight: the server grants that session the lock, and nobody bumps
    the epoch. Its kernel still answers keepalives, so the session lives as long as the
    pause. Another instance ends that session once it has held the lock unclaimed for
    evict_after, and leads."""
    procs, lines = await spawn(1)
    seen, _, first = await lines.wait(event="elected")
    # It waits on the lock in 5 s slices: its wait is in flight when it is paused.
    paused = ElectorProcess(
        dsn, "main", "paused", "--heartbeat", "5", "--lease", "15", "--evict-after", "30"
    )
    await paused.start(lines)
    listener = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await listener.execute("listen pgleader_events")
        await _on_the_lock(db, "paused", granted=False, timeout=10)
        paused.signal(signal.SIGSTOP)
        procs[first["instance"]].signal(signal.SIGKILL)
        await _on_the_lock(db, "paused", granted=True, timeout=5)
        more, _ = await spawn(1)  # evict_after 1.2 s
        (fresh,) = set(more) - set(procs)
        _, _, second = await lines.wait(since=seen + 1, event="elected", timeout=15)
        assert second["instance"] == fresh and second["epoch"] == first["epoch"] + 1
        cur = await db.execute(
            "select count(*) from pgleader.leadership_history where instance_id = 'paused'"
        )
        assert await cur.fetchone() == (0,)  # it never led
        events = []
        async with asyncio.timeout(5):
            async for note in listener.notifies():
                events.append(json.loads(note.payload))
                if events[-1]["event"] == "elected":
                    break
        (evicted,) = (e for e in events if e["event"] == "evicted")
        assert (evicted["epoch"], evicted["previous"], evicted["leader"]) == (None, "paused", fresh)
        assert describe_event(evicted) == (
            f"paused evicted of main by {fresh} (it was granted the lock and stopped before it led)"
        )
    finally:
        await listener.close()
        paused.signal(signal.SIGCONT)
        await paused.stop()
