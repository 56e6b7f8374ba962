"""The bare handoff: the least a lock-and-epoch takeover can cost on this server.

Three candidate processes, each one psycopg connection in autocommit, block on a
session advisory lock; the one granted bumps an epoch row and NOTIFYs it, three
statements, then holds the lock until it is killed:

    select pg_advisory_lock(ns, id)                         -- blocks
    update bench_handoff set epoch = epoch + 1 returning epoch
    select pg_notify('bench_handoff', '{"holder": ..., "epoch": ...}')

No heartbeat, no registry, no fencing, no history: what pgleader's crash takeover
is compared with (bench.failover runs both against the same server, rounds
interleaved). A round: SIGKILL the holder, and time from the kill to the
NOTIFY seen by an independent LISTEN client in this process (the same measure as
pgleader's `elected`); then restart the killed candidate, a waiter again.

With a footprint (`sessions`, `rss_mb`) each candidate also holds that many more
idle sessions and grows to that resident size before it waits: a process the size of a
gateway (its pool and LISTEN sessions, its memory) dies as slowly as a gateway does. On
SIGKILL the kernel frees the process's memory before it closes a socket, and every
session's backend then exits at once, on the same cores as the successor: the cost of
being killed with a footprint, whatever the takeover protocol. Two sets run side by side
(their own lock key and channel): bare, and bare with the killed gateway's footprint.

`python -m bench.handoff candidate --dsn DSN --id ID [--key K --sessions N --rss-mb M]`
runs one candidate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.sql

from bench.harness import uninterrupted

__all__ = ["BareHandoff"]

_NAMESPACE = 20261202  # the first key of the benchmark's advisory locks; the second is `key`
_TABLE = "create table if not exists bench_handoff (id integer primary key, epoch bigint not null)"
_ROW = "insert into bench_handoff values (%s, 0) on conflict do nothing"
# clock_timestamp() is read once the lock is granted, in the same statement: the
# moment the lock was free for the successor, whatever it runs next.
_LOCK = "select pg_advisory_lock(%s, %s), clock_timestamp()"
_BUMP = (
    "update bench_handoff set epoch = epoch + 1 where id = %s returning epoch, clock_timestamp()"
)
# The payload says, on the database clock, when the lock was granted, when the bump ran
# and when the NOTIFY was queued (pgleader's `elected` carries `at`): a handoff's phases.
_NOTIFY = (
    "select pg_notify(%s, json_build_object('holder', %s::text, 'epoch', %s::bigint,"
    " 'granted', %s::timestamptz, 'bumped', %s::timestamptz, 'at', clock_timestamp())::text)"
)
# What a gateway's pool session has done by the time it is killed, roughly: catalogs read.
_WORK = "select count(*) from pg_class c join pg_attribute a on a.attrelid = c.oid"


def channel(key: int) -> str:
    return f"bench_handoff_{key}"


def _ms_since(start: datetime, iso: str) -> float:
    return (datetime.fromisoformat(iso) - start).total_seconds() * 1000


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident set, MiB (Linux); this one's by default."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _resize(dsn: str, idle: list[psycopg.AsyncConnection[Any]], sessions: int) -> None:
    """Hold `sessions` idle sessions, each having read the catalogs once."""
    while len(idle) < sessions:
        idle.append(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
        await idle[-1].execute(_WORK)
    while len(idle) > sessions:
        await idle.pop().close()


async def _obey(dsn: str, idle: list[psycopg.AsyncConnection[Any]]) -> None:
    """`sessions N` lines on stdin: hold N idle sessions now, and say so on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        verb, _, value = line.decode().partition(" ")
        if verb == "sessions":
            await _resize(dsn, idle, int(value))
            print(json.dumps({"sessions": len(idle)}), flush=True)


async def candidate(dsn: str, ident: str, key: int = 1, sessions: int = 0, rss: int = 0) -> None:
    idle: list[psycopg.AsyncConnection[Any]] = []
    obeying: asyncio.Task[None] | None = None
    try:
        await _resize(dsn, idle, sessions)
        obeying = asyncio.create_task(_obey(dsn, idle))
        ballast = bytearray(max(0, int((rss - rss_mb()) * 2**20)))
        for i in range(0, len(ballast), 4096):  # resident, not just reserved
            ballast[i] = 1
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            print(json.dumps({"waiting": ident, "rss_mb": round(rss_mb(), 1)}), flush=True)
            cur = await conn.execute(_LOCK, [_NAMESPACE, key])
            granted = await cur.fetchone()
            cur = await conn.execute(_BUMP, [key])
            row = await cur.fetchone()
            assert row is not None and granted is not None
            await conn.execute(_NOTIFY, [channel(key), ident, row[0], granted[1], row[1]])
            print(json.dumps({"holding": ident, "epoch": row[0]}), flush=True)
            await asyncio.Event().wait()  # hold the lock until killed
    finally:
        if obeying is not None:
            obeying.cancel()
        for c in idle:
            await c.close()


class BareHandoff:
    """Three candidates on `dsn`; `round()` kills the holder and times the handoff.
    `key` tells sets apart; `sessions` and `rss_mb` give each candidate a footprint."""

    def __init__(
        self, dsn: str, workdir: Path, *, key: int = 1, sessions: int = 0, rss_mb: int = 0
    ) -> None:
        self.dsn, self.workdir = dsn, workdir
        self.key, self.sessions, self.rss_mb = key, sessions, rss_mb
        self.prefix = "bare" if not (sessions or rss_mb) else f"fp{key}_"
        self.candidate_rss_mb: list[float] = []
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.seen: list[tuple[float, dict[str, Any]]] = []
        self._arrived = asyncio.Event()
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._clock: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BareHandoff:
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                await c.execute(_TABLE)
                await c.execute(_ROW, [self.key])
            self._clock = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            self._listener = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            listen = psycopg.sql.SQL("listen {}").format(psycopg.sql.Identifier(channel(self.key)))
            await self._listener.execute(listen)
            self._task = asyncio.create_task(self._listen(self._listener))
            for ident in (f"{self.prefix}1", f"{self.prefix}2", f"{self.prefix}3"):
                await self._start(ident)
            await self._holder(timeout=30)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await uninterrupted(self._cleanup())

    async def _cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for conn in (self._listener, self._clock):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for n in conn.notifies():
            self.seen.append((time.monotonic(), json.loads(n.payload)))
            self._arrived.set()

    async def _start(self, ident: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.handoff", "candidate", "--dsn", self.dsn, "--id", ident,
            "--key", str(self.key), "--sessions", str(self.sessions), "--rss-mb", str(self.rss_mb),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).parent.parent,
        )  # fmt: skip
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)  # connected, about to lock
        if not line:
            raise RuntimeError(f"bare candidate {ident} ended before it waited on the lock")
        self.candidate_rss_mb.append(float(json.loads(line)["rss_mb"]))
        self.procs[ident] = proc

    async def _holder(self, timeout: float, since: int = 0) -> tuple[float, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.seen) <= since:
                self._arrived.clear()
                await self._arrived.wait()
        return self.seen[since]

    async def _waiting(self, ident: str) -> bool:
        """True once `ident`'s session waits on the lock (pg_locks, not granted)."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
            cur = await c.execute(
                "select count(*) from pg_locks where locktype = 'advisory' and not granted"
                " and classid = %s and objid = %s",
                [_NAMESPACE, self.key],
            )
            row = await cur.fetchone()
        return bool(row and row[0] >= 2)

    async def _hold_sessions(self, ident: str, sessions: int) -> None:
        """Have candidate `ident` hold `sessions` idle sessions besides its lock's."""
        proc = self.procs[ident]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"sessions {sessions}\n".encode())
        await proc.stdin.drain()
        async with asyncio.timeout(30):
            while True:  # past the "holding" line a candidate says once it holds the lock
                line = await proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"bare candidate {ident} ended while resizing")
                if json.loads(line).get("sessions") == sessions:
                    return

    async def round(self, sessions: int | None = None) -> dict[str, Any]:
        """Kill the holder; ms from the kill to the successor's NOTIFY seen here.
        `sessions`: the holder's sessions on the server when it is killed (its lock's
        and idle ones), to match another process's footprint round by round."""
        _, last = self.seen[-1]
        holder = str(last["holder"])
        if sessions is not None:
            await self._hold_sessions(holder, max(0, sessions - 1))
            await asyncio.sleep(0.2)  # the new backends settled, as a gateway's are
        mark = len(self.seen)
        assert self._clock is not None
        cur = await self._clock.execute("select clock_timestamp()")
        killed_db = (await cur.fetchone() or [None])[0]
        killed_at = time.monotonic()
        self.procs[holder].kill()
        at, payload = await self._holder(timeout=30, since=mark)
        row = {
            "sessions": sessions,
            "old_holder": holder,
            "new_holder": payload["holder"],
            "epoch": [last["epoch"], payload["epoch"]],
            "elected_ms": (at - killed_at) * 1000,
            # database clock, from the kill: the lock granted, the bump ran, the NOTIFY queued
            "granted_db_ms": _ms_since(killed_db, payload["granted"]),
            "bumped_db_ms": _ms_since(killed_db, payload["bumped"]),
            "notified_db_ms": _ms_since(killed_db, payload["at"]),
        }
        await self.procs[holder].wait()
        await self._start(holder)
        deadline = time.monotonic() + 30
        while not await self._waiting(holder):  # both others wait again before the next
            if time.monotonic() > deadline:
                raise RuntimeError("bare candidates did not wait on the lock again")
            await asyncio.sleep(0.02)
        return row


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff")
    verbs = parser.add_subparsers(dest="verb", required=True)
    one = verbs.add_parser("candidate", help="run one bare candidate")
    one.add_argument("--dsn", required=True)
    one.add_argument("--id", required=True)
    one.add_argument("--key", type=int, default=1, help="second key of the lock (a set's own)")
    one.add_argument("--sessions", type=int, default=0, help="idle sessions held besides")
    one.add_argument("--rss-mb", type=int, default=0, help="resident size to grow to, MiB")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(candidate(args.dsn, args.id, args.key, args.sessions, args.rss_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
