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
    seen, _, second = await lines.wait(since=seen + 1, event="elected")
    assert second["instance"] != old.instance_id and second["epoch"] == first["epoch"] + 1
    # Not before evict_after since its last heartbeat, on the database's clock (the
    # pause itself comes up to a heartbeat after that beat, so it is no lower bound).
    cur = await db.execute(
        "select h.release_reason, extract(epoch from h.released_at - i.last_heartbeat)::float8"
        "  from pgleader.leadership_history h join pgleader.instances i"
        "    on i.election = h.election and i.instance_id = h.instance_id"
        " where h.epoch = %s",
        [first["epoch"]],
    )
    reason, after_last_beat = await cur.fetchone()
    assert reason == "evicted"
    assert after_last_beat > 1.2, f"evicted {after_last_beat:.3f} s after its last heartbeat"

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


async def test_a_waiter_paused_as_the_lock_is_granted_leads_frozen_until_evicted(spawn, dsn, db):
    """The leader dies while a follower's process is paused (SIGSTOP, a frozen VM) with
    its wait in flight. The wait and the claim are one statement, so the server grants
    that session the lock and claims for it: it leads, frozen, and cannot beat. Its
    kernel still answers keepalives, so the session lives as long as the pause; another
    instance evicts it as a hung leader once it has been silent for evict_after, and
    leads. The frozen instance never acts: it would have to read its own election first,
    and its epoch is superseded."""
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
        assert second["instance"] == fresh and second["epoch"] == first["epoch"] + 2
        cur = await db.execute(
            "select epoch, release_reason from pgleader.leadership_history"
            " where instance_id = 'paused'"
        )
        assert await cur.fetchall() == [(first["epoch"] + 1, "evicted")]
        events = []
        async with asyncio.timeout(5):
            async for note in listener.notifies():
                events.append(json.loads(note.payload))
                if events[-1]["event"] == "elected" and events[-1]["leader"] == fresh:
                    break
        said = [(e["event"], e["epoch"], e["leader"], e["previous"]) for e in events]
        epoch = first["epoch"]
        assert said == [
            ("lost", epoch, None, first["instance"]),
            ("elected", epoch + 1, "paused", first["instance"]),
            ("evicted", epoch + 1, fresh, "paused"),
            ("elected", epoch + 2, fresh, "paused"),
        ], events
        assert describe_event(events[2]).startswith("paused evicted from the lead")
    finally:
        await listener.close()
        paused.signal(signal.SIGCONT)
        await paused.stop()


async def test_a_waiter_killed_while_it_waits_is_never_elected(spawn, dsn, db):
    """A follower's one statement waits on the lock and claims once it is granted, on
    the server: the session of a follower that died while it waited must end before
    the lock can come to it, or it would claim for nobody. The server looks for the
    client every 20 ms while the statement runs (client_connection_check_interval),
    and ends that session in the middle of its wait, long before its 30 s slice ends.
    The lock then goes to a live waiter, whose claim is the next epoch."""
    procs, lines = await spawn(1)
    seen, _, first = await lines.wait(event="elected")
    slow = ["--heartbeat", "30", "--lease", "90", "--evict-after", "180"]
    doomed = ElectorProcess(dsn, "main", "doomed", *slow)
    await doomed.start(lines)
    await _on_the_lock(db, "doomed", granted=False, timeout=10)  # first in the lock's queue
    live = ElectorProcess(dsn, "main", "live", *slow)
    await live.start(lines)
    try:
        await _on_the_lock(db, "live", granted=False, timeout=10)
        doomed.signal(signal.SIGKILL)
        assert doomed.proc is not None
        await asyncio.wait_for(doomed.proc.wait(), 10)

        async def session_gone() -> bool:
            cur = await db.execute(
                "select count(*) from pg_stat_activity where application_name like %s",
                ["%:doomed"],
            )
            return (await cur.fetchone())[0] == 0

        await until(session_gone, timeout=5)  # not the 30 s of its lock wait
        procs[first["instance"]].signal(signal.SIGKILL)
        _, _, second = await lines.wait(since=seen + 1, event="elected", timeout=15)
        assert (second["instance"], second["epoch"]) == ("live", first["epoch"] + 1)
        cur = await db.execute(
            "select count(*) from pgleader.leadership_history where instance_id = 'doomed'"
        )
        assert await cur.fetchone() == (0,)
    finally:
        await asyncio.gather(live.stop(), doomed.stop())
