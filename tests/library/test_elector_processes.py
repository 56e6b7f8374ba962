"""Electors in real child processes: SIGKILL and SIGSTOP the leader."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from pgleader import Fenced, check_epoch
from pgleader.demo import ElectorProcess, Timeline

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
