"""One instance's part in an election: wait for the lock, lead, heartbeat, step down.

The elector owns one dedicated connection (never pooled): a session advisory
lock lives and dies with its session. The cycle is

    connect -> join -> follow (wait on the lock; evict a hung leader)
            -> lead (bump the epoch; heartbeat) -> drop the connection -> again

Follow and the bump are one statement (pgleader.campaign): it waits on the lock a
heartbeat at most, and claims on the server as soon as the lock is granted.

An elector that may not lead (`eligible=False`) joins and beats as a follower but
never waits on the lock. The lock holder's epoch bump may find the lock is not
its to take: a switchover names another instance (`transfer`), or a live eligible
instance of higher `priority` is there; it then lets the lock go, holds back
briefly, and follows again (holding back for a priority once per vacancy, so a
preferred instance that does not come never keeps the election leaderless).

Leadership ends by dropping the connection, so a lock can never stack on a
session that already holds it, and a session in an unknown state is never
reused. `is_leader` is derived from a lease on the monotonic clock, so a paused
or partitioned process stops claiming leadership on time even if its loop never
runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import structlog
from psycopg import AsyncConnection

from pgleader import __version__
from pgleader.config import LogLevels, Timings, default_instance_id
from pgleader.connect import CLIENT_CHECK_MS, connect, describe_dsn, lock_session_conninfo
from pgleader.errors import (
    DatabaseUnavailable,
    NotLeader,
    PgLeaderError,
    SchemaMissing,
    TransferRefused,
    backoff,
    first_line,
)
from pgleader.fencing import check_epoch
from pgleader.metrics import Histogram
from pgleader.queries import QUERIES

__all__ = ["Elector", "Transition"]

log = structlog.get_logger("pgleader.election")

_JOIN = QUERIES["join_election"]
_SET_LOCK_TIMEOUT = QUERIES["set_lock_timeout"]
_CAMPAIGN = QUERIES["campaign"]
_FOLLOWER_BEAT = QUERIES["follower_beat"]
_REHEARSE = QUERIES["rehearse_claim"]
_TERMINATE_BLOCKERS = QUERIES["terminate_blockers"]
_HEARTBEAT = QUERIES["heartbeat"]
_RESIGN = QUERIES["resign"]
_REQUEST_TRANSFER = QUERIES["request_transfer"]
# Heartbeat round trips, s: a healthy one is about a millisecond; one near the lease is trouble.
_HEARTBEAT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# How often an elector whose database lost pgleader's schema looks again.
_SCHEMA_RETRY = 5.0
# The longest pause between attempts to reach the database again: a refused connection
# costs next to nothing, and a failover's new primary (or a restarted server) must find
# its instances campaigning within half a second of accepting writes.
_RECONNECT_CAP = 0.5


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of this instance's role. `epoch` is the epoch gained or given up."""

    kind: Literal["elected", "demoted", "resigned"]
    epoch: int
    reason: str
    at: float = field(default_factory=time.time)


class _Demoted(Exception):
    """Leadership ended; the connection must be dropped."""


class Elector:
    """Campaigns for `election` on `dsn` until stopped.

    Use as ``async with Elector(dsn, "orders") as elector:``. While
    ``elector.is_leader``, guard every side effect with ``await elector.fence(conn)``
    inside the transaction that claims the work.
    """

    def __init__(
        self,
        dsn: str,
        election: str = "default",
        *,
        instance_id: str | None = None,
        host: str | None = None,
        timings: Timings | None = None,
        log_levels: LogLevels | None = None,
        connect_timeout: float = 5.0,
        resign_cooldown: float | None = None,
        eligible: bool = True,
        priority: int = 0,
        before_transfer: Callable[[], Awaitable[Any]] | None = None,
        on_connect: Callable[[AsyncConnection[Any]], Awaitable[Any]] | None = None,
    ) -> None:
        if not election or len(election) > 200:
            raise ValueError("election name must be 1..200 characters")
        self.dsn = dsn
        self.election = election
        self.instance_id = instance_id or default_instance_id()
        self.host = host or _hostname()
        self.timings = (timings or Timings()).validate()
        self.log_levels = log_levels or LogLevels()
        self.connect_timeout = connect_timeout
        # After a resign, stay out of the race for a moment so another instance takes over.
        self.resign_cooldown = (
            self.timings.heartbeat if resign_cooldown is None else resign_cooldown
        )
        # eligible=False: joins and beats as a follower, never campaigns (--no-lead).
        self.eligible = eligible
        # Higher wins a failover: a lower one holds back this long, once per vacancy,
        # while a live eligible instance of a higher priority is there to take the lock.
        self.priority = priority
        self.hold_back = 2 * self.timings.heartbeat
        # Awaited (at most a lease) before a switchover's resign: the in-flight work ends.
        self._before_transfer = before_transfer
        # Awaited on the election session after every (re)connection, before it
        # campaigns: the caller's checks of the database it now reaches (a failed-over
        # database that went back in time). An exception drops the session and
        # rejoins later, as a connection error does.
        self._on_connect = on_connect
        self._handover: asyncio.Future[None] | None = None
        self._conninfo = lock_session_conninfo(
            dsn, self.timings, f"pgleader:{election}:{self.instance_id}"
        )
        self._epoch: int | None = None
        self._lease_deadline = 0.0
        self._resign_reason: str | None = None
        self._resign_requested = asyncio.Event()
        self._resigned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._subscribers: list[asyncio.Queue[Transition]] = []
        self._callbacks: list[Callable[[Transition], Any]] = []
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._failure: PgLeaderError | None = None
        self._leader_changed = asyncio.Condition()
        self.stats = {
            "heartbeats_ok": 0, "heartbeats_failed": 0, "elected": 0, "demoted": 0,
            "resigned": 0, "evictions": 0, "yielded": 0,
        }  # fmt: skip
        self.last_heartbeat_latency: float | None = None
        self.last_heartbeat_ok: float | None = None  # time.monotonic() of the last good beat
        self.heartbeat_seconds = Histogram(_HEARTBEAT_BUCKETS)
        self._log = log.bind(election=election, instance=self.instance_id)

    # -- public state ---------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True only while this instance holds the lock and its lease has not run out."""
        return self._epoch is not None and time.monotonic() < self._lease_deadline

    @property
    def epoch(self) -> int | None:
        """The epoch this instance leads under, or None when it does not lead."""
        return self._epoch if self.is_leader else None

    async def fence(self, conn: AsyncConnection[Any]) -> int:
        """Check, inside the caller's transaction, that this instance's epoch is current.

        Raises NotLeader when this instance does not lead by its own lease, Fenced
        when the database knows a newer epoch. Returns the epoch to stamp the work with.
        """
        epoch = self.require_epoch()
        await check_epoch(conn, self.election, epoch)
        return epoch

    def require_epoch(self) -> int:
        """The epoch to fence a statement with (see `pgleader.fenced_statement`).

        Raises NotLeader when this instance does not lead by its own lease. The
        database still has the last word: the statement's own check may find the
        epoch superseded.
        """
        epoch = self.epoch
        if epoch is None:
            raise NotLeader(f"instance {self.instance_id!r} does not lead {self.election!r}")
        return epoch

    async def wait_for_leadership(self, timeout: float | None = None) -> int:
        """Wait until this instance leads; returns the epoch. Raises SchemaMissing
        when the campaign ended because the database lacks pgleader's schema."""

        async def _wait() -> int:
            async with self._leader_changed:
                await self._leader_changed.wait_for(
                    lambda: self.is_leader or self._failure is not None
                )
                if self._failure is not None:
                    raise self._failure
                assert self._epoch is not None
                return self._epoch

        return await asyncio.wait_for(_wait(), timeout)

    def on_transition(self, callback: Callable[[Transition], Any]) -> None:
        """Call `callback(transition)` on every change of role.

        A coroutine function's coroutine runs as a task of its own; stop() gives the
        ones still running a heartbeat, then cancels them. A callback that raises is
        logged ("transition callback failed") and the election goes on. A plain
        function runs on the event loop: keep it quick.
        """
        self._callbacks.append(callback)

    async def transitions(self) -> AsyncIterator[Transition]:
        """Every change of role from now on, in order."""
        queue: asyncio.Queue[Transition] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    # -- life cycle -----------------------------------------------------------

    async def __aenter__(self) -> Elector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Check the database once, then campaign. Raises DatabaseUnavailable with a clear
        reason, or SchemaMissing when the database was never migrated."""
        if self._task is not None:
            raise RuntimeError("elector already started")
        conn = await connect(self._conninfo, timeout=self.connect_timeout, autocommit=True)
        try:
            await self._join(conn)  # proves the schema is there; the campaign joins again
        except psycopg.Error as exc:
            if _schema_missing(exc):
                raise self._missing(exc) from None
            # anything else may pass: the campaign retries it
        finally:
            await conn.close()
        self._failure = None
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"pgleader-elector-{self.election}")

    async def stop(self, reason: str = "shutdown") -> None:
        """Resign if leading, then stop campaigning. Prompt even while waiting on the lock."""
        if self._task is None:
            return
        if self.is_leader:
            with contextlib.suppress(TimeoutError):
                await self.resign(reason, timeout=self.timings.lease)
        self._stopping = True
        if self._handover is not None:
            self._handover.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._epoch is not None:
            self._demote("stopped")
        await self._end_callbacks(self.timings.heartbeat)

    async def resign(self, reason: str = "resigned", *, timeout: float | None = None) -> bool:
        """Hand leadership over: close the history row with `reason`, release the lock,
        NOTIFY. Returns False when this instance was not leading."""
        if not self.is_leader or self._task is None:
            return False
        self._resigned.clear()
        self._resign_reason = reason
        self._resign_requested.set()
        await asyncio.wait_for(self._resigned.wait(), timeout)
        return True

    async def transfer(
        self, to: str, *, timeout: float | None = None, bound: float | None = None
    ) -> None:
        """Hand leadership to instance `to` (a switchover): name it in the election
        row, fenced by this leader's epoch, so that for `bound` seconds (default 2 x
        evict_after) only `to` may take the lock, then anyone may; let the in-flight
        work end (`before_transfer`, at most a lease); resign.

        Raises NotLeader when this instance does not lead, TransferRefused (saying
        why, in one line) when `to` is unknown, not alive, may not lead or is this
        instance, TimeoutError when the resign took longer than `timeout`.
        """
        epoch = self.require_epoch()
        if to == self.instance_id:
            raise TransferRefused(f"instance {to!r} already leads")
        bound = 2 * self.timings.evict_after if bound is None else bound
        params = [self.election, to, epoch, self.timings.evict_after, bound]
        async with await connect(
            self._conninfo, timeout=self.connect_timeout, autocommit=True
        ) as side:
            cur = await side.execute(_REQUEST_TRANSFER, params)
            row = await cur.fetchone()
        if row is not None and row[0] is not None:
            raise TransferRefused(str(row[0]))
        self._log.info("leadership transfer requested", to=to, epoch=epoch, bound_s=bound)
        await asyncio.wait_for(asyncio.shield(self._hand_over_soon(to)), timeout)

    def _hand_over_soon(self, to: str) -> asyncio.Future[None]:
        """The hand-over to `to` under way, started if none is: one per switchover,
        whether asked here (transfer) or seen on a heartbeat (`pgleader transfer`)."""
        if self._handover is None or self._handover.done():
            self._handover = asyncio.ensure_future(self._hand_over(to))
            self._handover.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._handover

    async def _hand_over(self, to: str) -> None:
        """Let the in-flight work end (the heartbeats go on meanwhile), then resign,
        no sooner than two of the server's client checks after the request: a target
        found alive by its session alone (its process just died) has lost that session
        by then, and cannot be granted the lock and claim for nobody."""
        earliest = time.monotonic() + 2 * CLIENT_CHECK_MS / 1000
        if self._before_transfer is not None:
            try:
                async with asyncio.timeout(self.timings.lease):
                    await self._before_transfer()
            except Exception as exc:  # user code: never trusted; the transfer goes on
                self._log.warning("work before the transfer did not end", error=first_line(exc))
        await asyncio.sleep(max(0.0, earliest - time.monotonic()))
        await self.resign(f"transfer to {to}", timeout=self.timings.lease)

    # -- the cycle ------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            conn: AsyncConnection[Any] | None = None
            pause = 0.0
            try:
                conn = await connect(self._conninfo, timeout=self.connect_timeout, autocommit=True)
                failures = 0
                await self._join(conn)
                self._failure = None  # the schema is (back) in place
                if self._on_connect is not None:
                    await self._on_connect(conn)
                if not self.eligible:
                    await self._stand_by(conn)  # returns only by an error or a stop
                pause = await self._lead(conn, *await self._campaign(conn))
            except Exception as exc:  # whatever went wrong, step down and rejoin: never die
                if self._epoch is not None:
                    self._demote(first_line(exc))
                if _schema_missing(exc):
                    # Only a migration brings it back: say so once, end the waits, and
                    # look again now and then (a restored database, a migrate run later).
                    if self._failure is None:
                        await self._fail(self._missing(exc))
                    pause = _SCHEMA_RETRY
                else:
                    failures += 1
                    pause = backoff(failures, base=0.05, cap=_RECONNECT_CAP)
                    self._log.log(
                        self.log_levels.heartbeat_failed,
                        "election connection lost, rejoining",
                        error=first_line(exc),
                        retry_in=round(pause, 3),
                    )
            finally:
                if conn is not None:
                    await _drop(conn)
            if pause:
                await asyncio.sleep(pause)

    async def _join(self, conn: AsyncConnection[Any]) -> None:
        cur = await conn.execute(
            _JOIN,
            [self.election, self.instance_id, self.host, os.getpid(), __version__,
             self.eligible, self.priority],
        )  # fmt: skip
        assert await cur.fetchone() is not None  # the election's lock id
        # Wait on the lock in slices of one heartbeat, so a follower also polls for a hung leader.
        await conn.execute(_SET_LOCK_TIMEOUT, [f"{int(self.timings.heartbeat * 1000)}ms"])
        if self.eligible:  # a takeover then finds the claim compiled and planned (~5 ms)
            params = [self.election, self.instance_id, self.host, self.timings.evict_after]
            await conn.execute(_REHEARSE, params)

    async def _campaign(self, conn: AsyncConnection[Any]) -> tuple[int, Any, float]:
        """Follow until this session holds the lock and has bumped the epoch; returns
        the epoch, the previous leader and when the statement that did it was sent.

        One statement waits on the lock, one heartbeat at most (then a follower's
        beat, and again), and claims as soon as it is granted, on the server: no
        round trip between the grant and the bump. When the lock is not this
        instance's to take, the claim released it: hold back, follow again."""
        hold_back = True
        while True:
            sent = time.monotonic()
            try:
                cur = await self._take(conn, hold_back)  # the claim clears the lock timeout
            except psycopg.errors.LockNotAvailable:
                hold_back = True  # someone led meanwhile: a new vacancy
                await self._follower_beat(conn)
                continue
            row = await cur.fetchone()
            assert row is not None
            if row[0] is not None:
                return int(row[0]), row[1], sent
            self.stats["yielded"] += 1
            self._log.info(
                "lock left to a preferred instance", to=row[2], hold_back_s=self.hold_back
            )
            hold_back = False  # once per vacancy: next time, take it
            await conn.execute(_SET_LOCK_TIMEOUT, [f"{int(self.timings.heartbeat * 1000)}ms"])
            await asyncio.sleep(self.hold_back)

    async def _stand_by(self, conn: AsyncConnection[Any]) -> None:
        """An instance that may not lead: a follower's beat every heartbeat, for ever."""
        while True:
            await self._follower_beat(conn)
            await asyncio.sleep(self.timings.heartbeat)

    async def _follower_beat(self, conn: AsyncConnection[Any]) -> None:
        sent = time.monotonic()
        try:
            cur = await conn.execute(
                _FOLLOWER_BEAT, [self.election, self.instance_id, self.timings.evict_after]
            )
            row = await cur.fetchone()
        except psycopg.Error:
            self.stats["heartbeats_failed"] += 1
            raise
        self._beat_ok(sent)
        if row is not None and row[0] is not None:
            self.stats["evictions"] += 1
            self._log.warning("evicted a hung leader or lock holder", backend_pid=row[0])

    async def _lead(
        self, conn: AsyncConnection[Any], epoch: int, previous: Any, sent: float
    ) -> float:
        """Lead until demoted (raises _Demoted) or resigned; returns the pause before rejoining."""
        if time.monotonic() - sent > self.timings.heartbeat:
            # The bump waited (for blockers): prove the lock again, so the lease
            # starts now instead of having run out before we ever acted.
            sent = time.monotonic()
            cur = await conn.execute(_HEARTBEAT, [self.election, self.instance_id, epoch])
            beat = await cur.fetchone()
            if beat is None or not beat[0]:
                raise _Demoted("lock lost right after the epoch bump")
        self._lease_deadline = sent + self.timings.lease
        self.last_heartbeat_ok = time.monotonic()  # the bump proved the lock, as a beat does
        self._epoch = epoch
        self.stats["elected"] += 1
        self._log.log(self.log_levels.gained, "leadership gained", epoch=epoch, previous=previous)
        await self._announce(Transition("elected", epoch, "lock acquired"))
        try:
            while True:
                if await self._idle(conn, self.timings.heartbeat):
                    return await self._step_down(conn, epoch)
                await self._beat(conn, epoch)
        except asyncio.CancelledError:
            self._demote("stopped")
            raise

    async def _take(self, conn: AsyncConnection[Any], hold_back: bool) -> psycopg.AsyncCursor[Any]:
        """Wait on the lock and claim (holding back for a higher priority when
        `hold_back`). The epoch bump waits for fenced transactions holding the
        election row FOR SHARE; one still open a lease after the grant belongs to a
        hung process of an older epoch (a paused leader mid-claim) and would stall the
        failover, so it is terminated: it could never commit under its old epoch anyway.
        The wait on the lock comes first and lasts a heartbeat at most."""
        params = [self.election, self.instance_id, self.host, hold_back, self.timings.evict_after]
        take = asyncio.ensure_future(conn.execute(_CAMPAIGN, params))
        try:
            done, _ = await asyncio.wait(
                {take}, timeout=self.timings.heartbeat + self.timings.lease
            )
            while not done:
                await self._terminate_blockers(conn.info.backend_pid)
                done, _ = await asyncio.wait({take}, timeout=self.timings.heartbeat)
        except BaseException:
            take.cancel()
            raise
        return take.result()

    async def _terminate_blockers(self, backend_pid: int) -> None:
        with contextlib.suppress(psycopg.Error, DatabaseUnavailable):
            async with await connect(
                self._conninfo, timeout=self.connect_timeout, autocommit=True
            ) as side:
                cur = await side.execute(_TERMINATE_BLOCKERS, [backend_pid])
                pids = [r[0] for r in await cur.fetchall()]
                if pids:
                    self._log.warning("terminated sessions blocking the epoch bump", pids=pids)

    async def _idle(self, conn: AsyncConnection[Any], seconds: float) -> bool:
        """Sleep until the next beat; wake early when the server says something or a
        resign is requested. True when resigning.

        An idle session hears from the server unasked only when it is being ended
        (pg_terminate_backend, shutdown): libpq hands that FATAL to the notice
        handler as soon as the input is consumed, so we step down at once instead
        of waiting for the socket to close, which can come after the lock is free.
        """
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, wake)
        resign: asyncio.Future[Any] = asyncio.ensure_future(self._resign_requested.wait())
        waits: set[asyncio.Future[Any]] = {readable, resign}
        try:
            await asyncio.wait(waits, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            loop.remove_reader(fd)
            resign.cancel()
        if readable.done():
            fatal: list[str] = []
            handler = functools.partial(_collect_fatal, into=fatal)
            conn.add_notice_handler(handler)
            try:
                conn.pgconn.consume_input()
                conn.pgconn.is_busy()  # parses the input: an idle-time error goes to notices
            except psycopg.OperationalError as exc:
                raise _Demoted(f"session lost: {first_line(exc)}") from exc
            finally:
                conn.remove_notice_handler(handler)
            if fatal:
                raise _Demoted(f"session ended by the server: {fatal[0]}")
        return self._resign_requested.is_set()

    async def _beat(self, conn: AsyncConnection[Any], epoch: int) -> None:
        sent = time.monotonic()
        remaining = self._lease_deadline - sent
        beat = asyncio.ensure_future(
            conn.execute(_HEARTBEAT, [self.election, self.instance_id, epoch])
        )
        try:
            done, _ = await asyncio.wait({beat}, timeout=max(0.0, remaining))
            if not done:
                # Not wait_for: it would wait for the cancellation, and cancelling a
                # query on a partitioned session hangs too. Step down now.
                _abandon(beat)
                self.stats["heartbeats_failed"] += 1
                raise _Demoted("lease expired: no heartbeat succeeded in time")
            cur = beat.result()
            row = await cur.fetchone()
        except psycopg.Error:
            self.stats["heartbeats_failed"] += 1
            raise
        if row is None or not row[0]:
            self.stats["heartbeats_failed"] += 1
            raise _Demoted("lock not held by this session or epoch superseded")
        self._beat_ok(sent)
        self._lease_deadline = sent + self.timings.lease
        if row[1] is not None:  # a switchover names another instance (`pgleader transfer`)
            self._hand_over_soon(str(row[1]))

    def _beat_ok(self, sent: float) -> None:
        now = time.monotonic()
        self.stats["heartbeats_ok"] += 1
        self.last_heartbeat_ok = now
        self.last_heartbeat_latency = now - sent
        self.heartbeat_seconds.observe(now - sent)

    async def _step_down(self, conn: AsyncConnection[Any], epoch: int) -> float:
        reason = self._resign_reason or "resigned"
        self._epoch = None  # stop acting before anything else
        try:
            await asyncio.wait_for(
                conn.execute(_RESIGN, [self.election, self.instance_id, epoch, reason]),
                self.timings.lease,
            )
        finally:
            self._resign_requested.clear()
            self._resigned.set()
        self.stats["resigned"] += 1
        self._log.log(self.log_levels.resigned, "leadership resigned", epoch=epoch, reason=reason)
        await self._announce(Transition("resigned", epoch, reason))
        return self.resign_cooldown

    def _missing(self, exc: BaseException) -> SchemaMissing:
        return SchemaMissing(
            f"database {describe_dsn(self.dsn)} lacks pgleader's schema ({first_line(exc)}):"
            " run `pgleader migrate` first"
        )

    async def _fail(self, failure: PgLeaderError) -> None:
        """Tell once that no campaign is possible; wait_for_leadership() raises `failure`
        until the campaign can go on again."""
        self._log.error(
            "election paused: schema missing", error=str(failure), retry_every=_SCHEMA_RETRY
        )
        self._failure = failure
        async with self._leader_changed:
            self._leader_changed.notify_all()

    def _demote(self, reason: str) -> None:
        epoch, self._epoch = self._epoch, None  # stop acting before anything else
        if epoch is None:
            return
        self.stats["demoted"] += 1
        self._log.log(self.log_levels.lost, "leadership lost", epoch=epoch, reason=reason)
        self._resigned.set()
        self._notify(Transition("demoted", epoch, reason))

    async def _announce(self, transition: Transition) -> None:
        self._notify(transition)
        async with self._leader_changed:
            self._leader_changed.notify_all()

    def _notify(self, transition: Transition) -> None:
        for queue in self._subscribers:
            queue.put_nowait(transition)
        for callback in self._callbacks:
            self._call(callback, transition)

    def _call(self, callback: Callable[[Transition], Any], transition: Transition) -> None:
        """Call a user's callback, never trusting it: an exception is logged and the
        election goes on; a coroutine runs as a task of its own, never awaited here,
        so a slow one cannot hold up a heartbeat."""
        try:
            result = callback(transition)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(functools.partial(self._called, callback, transition))
        except Exception as exc:
            self._callback_failed(callback, transition, exc)

    def _called(
        self, callback: Callable[[Transition], Any], t: Transition, task: asyncio.Future[Any]
    ) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # retrieved
            self._callback_failed(callback, t, exc)

    def _callback_failed(
        self, callback: Callable[[Transition], Any], transition: Transition, exc: BaseException
    ) -> None:
        self._log.error(
            "transition callback failed", callback=_name(callback), transition=transition.kind,
            epoch=transition.epoch, error=first_line(exc), exc_info=exc,
        )  # fmt: skip

    async def _end_callbacks(self, grace: float) -> None:
        """Give callbacks still running `grace` seconds, then cancel them: nothing the
        elector started outlives its stop()."""
        running = self._callback_tasks - {asyncio.current_task()}  # stop() from a callback
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=grace)
        if late:
            self._log.warning(
                "transition callbacks cancelled at stop", grace_s=grace, count=len(late)
            )
            for task in late:
                task.cancel()
            await asyncio.wait(late, timeout=grace)

    def __repr__(self) -> str:
        return (
            f"<Elector {self.election!r} {self.instance_id!r} at {describe_dsn(self.dsn)} "
            f"epoch={self.epoch}>"
        )


async def _drop(conn: AsyncConnection[Any]) -> None:
    """Close a lock session for good: whatever it held is released by the server."""
    try:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.cancel_safe(timeout=1.0), 1.5)
    finally:  # even when cancelled (stop) while cancelling
        with contextlib.suppress(Exception):
            await conn.close()


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel a task nobody will wait for, and swallow whatever it ends with."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _collect_fatal(diag: psycopg.errors.Diagnostic, *, into: list[str]) -> None:
    if diag.severity_nonlocalized in ("FATAL", "PANIC"):
        into.append(diag.message_primary or "FATAL")


def _schema_missing(exc: BaseException) -> bool:
    """The server says a pgleader schema object is not there: a migration is missing."""
    return isinstance(
        exc,
        psycopg.errors.InvalidSchemaName
        | psycopg.errors.UndefinedFunction
        | psycopg.errors.UndefinedTable,
    )


def _name(callback: Callable[..., Any]) -> str:
    """module.qualname of a callback, for a log line; its repr when it has none."""
    qualname = getattr(callback, "__qualname__", None)
    if qualname is None:
        return repr(callback)
    module = getattr(callback, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


def _hostname() -> str:
    try:
        return socket.gethostname() or "unknown"
    except OSError:
        return "unknown"
