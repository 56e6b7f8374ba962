"""One gateway instance: its pool, elector, executor, spool and background jobs.

Every instance accepts signals; only the leader executes them. Start-up waits
for the database (bounded exponential backoff; a wrong password or database
fails at once), applies missing migrations, then campaigns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import DatabaseUnavailable, Elector, SchemaMissing, Transition, migrate
from pgleader.connect import connect, with_settings
from pgleader.errors import backoff, first_line
from pgleader.events import EVENTS_CHANNEL, Reconnected, listen
from pgleader.jobs import Job, JobRun, JobRunner
from pgleader.migrations import pending
from pgleader.queries import QUERIES as LIBRARY_QUERIES
from pgleader.redis import LeaderPublisher, RedisLink
from service.alerts.delivery import AlertDelivery
from service.alerts.outage import OutageAlarm
from service.alerts.sinks import build_sinks
from service.brokers.base import Broker
from service.brokers.metered import MeteredBroker
from service.brokers.openalgo import OpenAlgoBroker
from service.brokers.paper import PaperBroker
from service.config import ServiceConfig
from service.errors import DATABASE_UNAVAILABLE, SignalError, SpoolError
from service.execution.executor import Executor
from service.execution.reconciliation import Reconciler, as_run
from service.intake.fingerprint_cache import FingerprintCache
from service.intake.inbox import (
    NOTIFY_CHANNEL,
    Inbox,
    get_signal,
    notify_signal,
    parse_notification,
)
from service.intake.refusals import Refusals
from service.intake.signals import Signal
from service.intake.spool import Spool, Spooled
from service.jobs.maintenance import PruneInstances, Retention, Statistics
from service.jobs.rollover import Rollover
from service.queries import QUERIES
from service.status import StatusFeed
from service.watermark import Watermark

__all__ = ["Gateway"]

log = structlog.get_logger("service")

# Failures no retry can fix: say so at once instead of backing off for a minute.
_PERMANENT = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
              "invalid", "<unparsable DSN>", "role")  # fmt: skip
# What GET /coordinator/leader shows of stats() (its OpenAPI schema lists exactly these).
_LEADER_VIEW_METRICS = (
    "heartbeats_ok", "heartbeats_failed", "heartbeat_latency_ms", "leadership_changes",
    "times_elected", "spooled", "executions", "execution_batches", "inbox_writes",
)  # fmt: skip
# How long a webhook waits for its inbox write before it spools the signal instead.
_STORE_BUDGET = 1.5
# The whole answer, store and inline execution, well inside TradingView's 3 s.
_ANSWER_BUDGET = 2.5
# Inline executions that ended here: answered 200 with the outcome (else 202 accepted).
_ANSWERED = frozenset({"executed", "failed", "expired", "rejected"})
_RAISE_ALERT = QUERIES["raise_alert"]
_REQUEST_RECONCILIATION = QUERIES["request_reconciliation"]
_RECONCILIATION = QUERIES["reconciliation"]
_HALT = QUERIES["trading_halt"]
_SET_HALT = QUERIES["set_trading_halt"]
_RECORD_SETTINGS = QUERIES["record_settings"]
_SETTINGS_OF_INSTANCES = QUERIES["settings_of_instances"]
_ELECTION_LEADER = QUERIES["election_leader"]
_WATERMARK_ELECTION = QUERIES["watermark_election"]
_STATISTICS = QUERIES["statistics"]
_JOB_LIST = LIBRARY_QUERIES["job_list"]
_REQUEST_JOB = LIBRARY_QUERIES["request_job"]
_JOB_RUN_STATE = LIBRARY_QUERIES["job_run_state"]
_OPEN_SIGNALS = QUERIES["open_signals"]
# Signals not yet ended, by status, as /metrics shows them (counted this often).
OPEN_STATUSES = ("pending", "executing", "in_doubt", "awaiting_approval")
_COUNT_EVERY = 5.0
# A pool slot's reconnection attempts give up after this (psycopg_pool's first pause,
# 1 s, is cut to it), and _reconnect_failed starts new ones at once: the pool tries again
# every half second however long the outage.
_RECONNECT_WINDOW = 0.5
# How long Redis keeps a stored signal's fingerprint (at least the max signal age).
_FINGERPRINT_TTL = 24 * 3600.0


class Gateway:
    def __init__(self, config: ServiceConfig, dsn: str) -> None:
        self.config = config
        self.dsn = dsn
        # A claim left open by a paused process must not hold the election row for long.
        pool_dsn = with_settings(
            dsn, idle_in_transaction_session_timeout=int(config.timings.evict_after * 1000)
        )
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            pool_dsn,
            min_size=4,  # a burst need not wait for connections to be opened
            max_size=10,
            open=False,
            kwargs={"autocommit": True, "application_name": f"gateway:{config.instance_id}"[:63]},
            timeout=1.0,  # a webhook must answer within TradingView's 3 s: spool instead
            # psycopg_pool's own backoff (1 s, doubling without a cap) would leave the new
            # leader without connections for seconds after a failover: a slot gives up
            # after half a second and the next attempt starts at once, so the pool is back
            # within half a second of the database (a failover of 20-30 s included).
            reconnect_timeout=_RECONNECT_WINDOW,
            reconnect_failed=_reconnect_failed,
            reset=_writable,
        )
        # What this instance saw of the database, checked on every reconnection of the
        # election session before it campaigns (a failover that lost commits).
        self.watermark = Watermark(
            config.data_dir / "watermark" / f"{config.instance_id}.json", config.election,
            config.instance_id, config.retention_days,
        )  # fmt: skip
        self.elector = Elector(
            dsn, config.election, instance_id=config.instance_id, timings=config.timings,
            eligible=config.lead, priority=config.priority,
            before_transfer=self._drain_for_transfer, on_connect=self.watermark.check,
        )  # fmt: skip
        self.broker = _broker(config, self.pool)
        # What the gateway's parts call: the broker, counted and timed for /metrics.
        self.metered_broker = MeteredBroker(self.broker)
        self.inbox = Inbox(self.pool, config.instance_id)
        self.executor = Executor(
            self.pool,
            self.elector,
            self.metered_broker,
            max_age=config.max_signal_age,
            instruments=config.trading,
            broker_timeout=config.broker_timeout,
            settle=config.broker_settle,
            reorder_window=config.reorder_window,
            halt_action=config.halt_action,
            batch_interval=config.batch_interval,
        )
        self.reconciler = Reconciler(
            self.pool, self.elector, self.metered_broker, self.executor.resolve, config.trading
        )
        self.settings_fingerprint = config.settings_fingerprint
        self._reconcile_on_election = False
        self.rollover = Rollover(
            self.pool, self.metered_broker, config.trading, settle=config.broker_settle,
            broker_timeout=config.broker_timeout, on_rolled=lambda name: self._wake.set(),
        )  # fmt: skip
        self.jobs = JobRunner(self.pool, self.elector, self._jobs(), on_failure=self._job_failing)
        self.alerts = AlertDelivery(
            self.pool, self.elector, build_sinks(config.sinks),
            group_interval=config.alert_group_interval, send_timeout=config.alert_timeout,
        )  # fmt: skip
        self._jobs_read_at = 0.0
        self.halt_mode: str | None = None  # the kill switch as last read (None: not yet)
        self._watermark_saved_at = 0.0
        self.spool = Spool(config.spool_path, max_bytes=config.spool_max_bytes)
        # The database away: this instance tells the sinks itself (the leader cannot).
        self.outage = OutageAlarm(
            build_sinks(config.sinks), config.instance_id, after=config.db_down_alert_after,
            send_timeout=config.alert_timeout, spooled=lambda: self.spool.stats()["records"],
        )  # fmt: skip
        self.shutting_down = False
        self.started_at = time.time()
        self.responses: dict[str, int] = {}
        self.refusals = Refusals()  # authenticated webhooks refused as invalid: alerted
        self.status = StatusFeed(
            self.pool, dsn, config.election, config.instance_id, config.timings.evict_after
        )
        self.open_signals: dict[str, int] | None = None  # by status; None: not counted yet
        self.oldest_open: dict[str, float] = {}  # by status: seconds since it was received
        self.open_signals_at = 0.0  # time.monotonic() of that count
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncio.Task[None] | None = None
        self.elector.on_transition(self._on_transition)
        # Optional, never authoritative: a hint of who leads, duplicates' answers in an outage.
        self.redis: RedisLink | None = None
        self.leader_key: LeaderPublisher | None = None
        self.fingerprints: FingerprintCache | None = None
        if config.redis_url:
            self.redis = RedisLink(config.redis_url)
            self.leader_key = LeaderPublisher(self.redis, self.elector, url=_public_url(config))
            ttl = max(_FINGERPRINT_TTL, config.max_signal_age.total_seconds())
            self.fingerprints = FingerprintCache(self.redis, config.election, ttl)

    # -- life cycle -----------------------------------------------------------

    async def start(self) -> None:
        self.spool.check_directory()  # an unusable data dir fails now, not in an outage
        await _wait_for_database(self.dsn, self.config.startup_timeout)
        if self.config.migrate:
            applied = await migrate(self.dsn)
            if applied:
                log.info("migrations applied", files=applied)
        else:
            await _require_migrated(self.dsn)
        await self.pool.open(wait=True, timeout=10)
        if isinstance(self.broker, OpenAlgoBroker):
            await self.broker.start()
        await self._record_settings()
        if self.leader_key is not None:
            log.info("redis cache in use", redis=self.leader_key.link.where)
            self.leader_key.start()
        await self.elector.start()
        self._tasks = [asyncio.create_task(self._sweep_loop(), name="gateway-sweep")]

    async def stop(self) -> None:
        self.shutting_down = True
        self.status.close()
        await self.inbox.close()
        await self.executor.drain(self.config.shutdown_timeout)
        # A message under way ends and is recorded first: the successor need not repeat it.
        await self.alerts.drain(min(5.0, self.config.shutdown_timeout), final=True)
        await self.elector.stop("shutdown")  # resign + NOTIFY: a follower takes over at once
        if self.leader_key is not None:
            await self.leader_key.stop()  # its key goes, unless a successor's is there
        await self.jobs.stop()
        await self.alerts.stop()
        await self.outage.close()
        await self.executor.stop()
        self._stop_listening()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pool.close()
        self.spool.close()
        if isinstance(self.broker, OpenAlgoBroker):
            await self.broker.close()
        if self.fingerprints is not None:
            await self.fingerprints.close()
        if self.redis is not None:
            await self.redis.close()

    def _on_transition(self, t: Transition) -> None:
        if t.kind == "elected":
            self.watermark.saw_epoch(t.epoch, self.config.instance_id)
            self._wake.set()  # sweep and settle at once
            self._reconcile_on_election = True  # compare positions with the broker first
            if self._listener is None and not self.shutting_down:
                self._listener = asyncio.create_task(self._listen(), name="gateway-listen")
        else:
            self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    # -- accepting a signal ---------------------------------------------------

    async def accept(self, signal: Signal, fp: str) -> tuple[int, dict[str, Any]]:
        """Store (or spool) a validated signal; execute inline when leading.
        Returns the HTTP status and JSON answer."""
        leading = self.elector.is_leader
        started = time.monotonic()
        try:
            # A database that hangs instead of refusing must not hold the answer past
            # TradingView's 3 s: spool instead. The write goes on and may still commit:
            # replay then finds the fingerprint stored, nothing is executed twice.
            async with asyncio.timeout(_STORE_BUDGET):
                stored = await self.inbox.store(signal, fp, notify=not leading)
        except (*DATABASE_UNAVAILABLE, TimeoutError) as exc:
            try:
                await self.spool.append(signal, fp, datetime.now(UTC))
            except SpoolError as spool_exc:  # the spool alerts; one line per refusal here
                log.error(
                    "signal refused: database unreachable and the spool refused it",
                    fingerprint=fp, reason=spool_exc.reason, error=str(spool_exc),
                )  # fmt: skip
                return 503, {
                    "status": "spool_full" if spool_exc.full else "unavailable",
                    "error": f"database unreachable and the spool refused the signal"
                    f" ({spool_exc.reason}); retry",
                }
            why = (
                "no answer within the budget" if isinstance(exc, TimeoutError) else first_line(exc)
            )
            log.error("database unreachable: signal spooled", fingerprint=fp, error=why)
            # Kept in the spool whatever Redis says; Redis may only change the answer.
            original = None if self.fingerprints is None else await self.fingerprints.lookup(fp)
            if original is not None:
                log.info("spooled signal known to Redis: answered as a duplicate",
                         fingerprint=fp, signal_id=original)  # fmt: skip
                return 200, {"status": "duplicate", "signal_id": original}
            return 202, {"status": "spooled", "fingerprint": fp}
        if self.fingerprints is not None:
            self.fingerprints.remember(fp, stored.signal_id)  # the inbox holds it now
        if stored.duplicate:
            return 200, {"status": "duplicate", "signal_id": stored.signal_id}
        self.watermark.answered(stored.signal_id, fp)  # answered 2xx from the inbox
        if leading:
            budget = _ANSWER_BUDGET - (time.monotonic() - started)
            status = await self._execute_inline(stored.signal_id, budget)
            if status in _ANSWERED:
                return 200, {"status": status, "signal_id": stored.signal_id}
        return 202, {"status": "accepted", "signal_id": stored.signal_id}

    async def _execute_inline(self, signal_id: int, budget: float) -> str:
        """Execute a signal this (leading) instance just stored without a NOTIFY,
        waiting at most `budget` seconds (or the inline timeout) for its outcome; the
        NOTIFY of one left pending is sent within what remains of `budget` too."""
        deadline = time.monotonic() + budget
        try:
            async with asyncio.timeout(max(0.0, min(self.config.inline_timeout, budget))):
                status = await self.executor.execute(signal_id)
        except TimeoutError:
            status = "executing"  # still in its batch, which goes on
        except Exception:
            log.exception("inline execution failed; the sweep retries", signal_id=signal_id)
            status = "pending"
        if status in ("not_leader", "pending"):
            # Nobody else knows of it yet: the NOTIFY skipped at store time goes out now,
            # unless the answer's budget is spent (a database that hangs): it only hastens
            # what the leader's sweep does within a second anyway.
            with contextlib.suppress(*DATABASE_UNAVAILABLE, TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    async with self.pool.connection() as conn:
                        await notify_signal(conn, signal_id)
        if status not in _ANSWERED:
            log.info(
                "inline execution left to the leader's loop", signal_id=signal_id, status=status
            )
        return status

    async def _store_spooled(self, item: Spooled) -> None:
        stored = await self.inbox.store(item.signal, item.fingerprint, item.received_at)
        if self.fingerprints is not None:
            self.fingerprints.remember(item.fingerprint, stored.signal_id)

    def refused(self, error: SignalError, body: bytes) -> None:
        """An authenticated webhook answered 400: alerted by the sweep (service.intake.refusals)."""
        self.refusals.record(error, body)

    async def _raise_alert(self, kind: str, detail: str) -> None:
        async with self.pool.connection(timeout=1.0) as conn:
            await conn.execute(_RAISE_ALERT, [kind, self.config.instance_id, detail])

    # -- background jobs ------------------------------------------------------

    async def _listen(self) -> None:
        """The leader's ear for signals stored by other instances, and for alerts and
        transitions to deliver (pgleader_events). Only the leader listens: followers
        would only throw every notification away. The first Reconnected comes once
        LISTEN is in place: the sweep it wakes covers whatever was stored before."""
        name = f"gateway-listen:{self.config.instance_id}"
        me = asyncio.current_task()
        items = listen(self.dsn, NOTIFY_CHANNEL, EVENTS_CHANNEL, application_name=name)
        async with contextlib.aclosing(items):
            async for item in items:
                if self._listener is not me:
                    return  # replaced or stopped, should a cancellation have been lost
                if isinstance(item, Reconnected):
                    self._wake.set()  # notifications may have been missed: sweep
                    self.alerts.wake()
                elif item.channel == EVENTS_CHANNEL:
                    self.alerts.wake()  # an alert or a transition to deliver
                elif item.payload in ("halt", "reconcile"):
                    self._wake.set()  # resumed: what waited goes; a run was asked for
                elif self.elector.is_leader:
                    self.executor.enqueue(parse_notification(item.payload))

    async def _sweep_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
            # cancellation that stops this loop, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.sweep_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if self.spool.waiting():
                    replayed = await self.spool.replay(self._store_spooled)
                    log.warning("spool replayed into the inbox", signals=replayed)
                await self.spool.flush_alerts(self._raise_alert)
                await self.refusals.flush(self._raise_alert)
                self.halt_mode = (await self.trading_halt())["mode"]
                await self._read_epoch()
                if time.monotonic() - self.open_signals_at > _COUNT_EVERY:
                    await self._count_open_signals()
                await self.executor.sweep()
                await self.executor.reconcile()
                await self._reconcile_positions()
                if not self.elector.is_leader and time.monotonic() - self._jobs_read_at > 10:
                    self._jobs_read_at = time.monotonic()
                    await self.jobs.refresh()  # a follower's figures of the leader's jobs
            except DATABASE_UNAVAILABLE as exc:
                self.outage.observe(reachable=False)
                log.warning("sweep failed; will retry", error=first_line(exc))
            except OSError as exc:
                log.warning("sweep failed; will retry", error=first_line(exc))
            except Exception:
                log.exception("sweep crashed; will retry")
            else:
                self.outage.observe(reachable=True)

    async def _read_epoch(self) -> None:
        """The election's epoch and leader into the watermark (a follower learns of
        every election here); the watermark to disk at most once a second."""
        async with self.pool.connection(timeout=1.0) as conn:
            row = await (await conn.execute(_WATERMARK_ELECTION, [self.config.election])).fetchone()
        if row is not None:
            self.watermark.saw_epoch(row[0], row[1], row[2])
        if time.monotonic() - self._watermark_saved_at >= 1.0:
            self._watermark_saved_at = time.monotonic()
            await asyncio.to_thread(self.watermark.save)

    async def _count_open_signals(self) -> None:
        """For /metrics, which never queries (a scrape answers at once while the
        database is down): the figures are this count's, with its age beside them."""
        async with self.pool.connection(timeout=1.0) as conn:
            rows = await (await conn.execute(_OPEN_SIGNALS)).fetchall()
        self.open_signals = dict.fromkeys(OPEN_STATUSES, 0) | {str(s): int(n) for s, n, _ in rows}
        self.oldest_open = {str(s): float(age) for s, _, age in rows}
        self.open_signals_at = time.monotonic()

    async def _reconcile_positions(self) -> None:
        """The reconciliations an operator asked for, and the leader's own when it is
        elected (its schedule is the `reconcile` job)."""
        if not self.elector.is_leader:
            return
        if self._reconcile_on_election:
            async with self.pool.connection() as conn:
                await conn.execute(_REQUEST_RECONCILIATION, ["elected", self.config.instance_id])
            self._reconcile_on_election = False
        await self.reconciler.run_requested()

    # -- the leader's jobs ----------------------------------------------------------

    def _jobs(self) -> list[Job]:
        c = self.config
        retention = Retention(self.pool, c.retention_days)
        statistics = Statistics(self.pool, c.trading)
        prune = PruneInstances(self.pool, c.prune_instances_after)
        return [
            Job("reconcile", self._scheduled_reconciliation, every=c.reconcile_interval,
                timeout=max(60.0, 4 * c.broker_timeout)),
            Job("rollover", self.rollover.run, every=c.rollover_interval, timeout=300.0),
            Job("retention", retention.run, every=3600.0, timeout=1800.0),
            Job("statistics", statistics.run, every=c.statistics_interval, timeout=120.0),
            Job("prune-instances", prune.run, every=3600.0, timeout=60.0),
        ]  # fmt: skip

    async def _scheduled_reconciliation(self, run: JobRun) -> str:
        async with self.pool.connection() as conn:
            await conn.execute(_REQUEST_RECONCILIATION, ["schedule", self.config.instance_id])
        ran = await self.reconciler.run_requested()
        outcome = (self.reconciler.last or {}).get("outcome")
        if outcome == "failed":
            raise RuntimeError(f"reconciliation failed: {(self.reconciler.last or {})['detail']}")
        return f"{ran} reconciliation(s) run, last {outcome}"

    async def _job_failing(self, job: str, failures: int, error: str) -> None:
        detail = f"job {job} failed {failures} times in a row; last error: {error}"
        async with self.pool.connection(timeout=1.0) as conn:
            await conn.execute(_RAISE_ALERT, ["job_failing", self.config.instance_id, detail])

    async def _record_settings(self) -> None:
        """Put this instance's trading-settings fingerprint in the registry, and alert
        when another live instance has another one."""
        async with self.pool.connection() as conn:
            await conn.execute(
                _RECORD_SETTINGS,
                [self.config.election, self.config.instance_id, self.settings_fingerprint],
            )
            others = await self._disagreeing(conn)
            if others:
                detail = (
                    f"instance {self.config.instance_id} trades with settings"
                    f" {self.settings_fingerprint}, unlike {', '.join(others)}: followers"
                    " decide what they accept, the leader what it executes"
                )
                await conn.execute(
                    _RAISE_ALERT, ["settings_disagree", self.config.instance_id, detail]
                )
                log.error("instances disagree on their trading settings", others=others)

    async def _disagreeing(self, conn: Any) -> list[str]:
        cur = await conn.execute(_SETTINGS_OF_INSTANCES, [self.config.election])
        return [
            f"{instance} ({fingerprint})"
            for instance, fingerprint in await cur.fetchall()
            if instance != self.config.instance_id and fingerprint != self.settings_fingerprint
        ]

    # -- the kill switch and reconciliation -------------------------------------

    async def trading_halt(self) -> dict[str, Any]:
        async with self.pool.connection(timeout=1.0) as conn:
            row = await (await conn.execute(_HALT)).fetchone()
        keys = ("mode", "reason", "changed_by", "changed_at")
        return dict(zip(keys, row, strict=True)) if row else {"mode": "running"}

    async def set_trading_halt(self, mode: str, reason: str | None, by: str) -> dict[str, Any]:
        async with self.pool.connection(timeout=1.0) as conn:
            await conn.execute(_SET_HALT, [mode, reason, by])
        return await self.trading_halt()

    async def reconcile_now(self, trigger: str, timeout: float) -> dict[str, Any]:
        """Ask the leader for a reconciliation and wait for its result (at most
        `timeout` s); the run's row, its outcome null when none came in time."""
        async with self.pool.connection(timeout=1.0) as conn:
            cur = await conn.execute(_REQUEST_RECONCILIATION, [trigger, self.config.instance_id])
            (request_id,) = await cur.fetchone() or (None,)
        deadline = time.monotonic() + timeout
        while True:
            async with self.pool.connection(timeout=1.0) as conn:
                row = await (await conn.execute(_RECONCILIATION, [request_id])).fetchone()
            run = as_run(row)
            if run["outcome"] is not None or time.monotonic() >= deadline:
                return run
            await asyncio.sleep(0.05)

    # -- jobs and statistics -------------------------------------------------------

    async def job_list(self) -> list[dict[str, Any]]:
        async with self.pool.connection(timeout=1.0) as conn:
            cur = await conn.execute(_JOB_LIST, {"election": self.config.election})
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    async def run_job(self, name: str, timeout: float) -> dict[str, Any] | None:
        """Ask the leader to run a job now and wait at most `timeout` s for its end:
        the run (its outcome None if it has not ended), or None for an unknown job."""
        by = f"admin via {self.config.instance_id}"
        async with self.pool.connection(timeout=1.0) as conn:
            row = await (
                await conn.execute(_REQUEST_JOB, [self.config.election, name, by])
            ).fetchone()
        if row is None or row[0] is None:
            return None
        self.jobs.wake()
        requested_at, deadline = row[0], time.monotonic() + timeout
        keys = ("done", "outcome", "result", "duration_s", "started_at", "finished_at")
        while True:
            async with self.pool.connection(timeout=1.0) as conn:
                cur = await conn.execute(_JOB_RUN_STATE, [requested_at, self.config.election, name])
                state = dict(zip(keys, await cur.fetchone() or (), strict=False))
            if state.get("done") or time.monotonic() >= deadline:
                done = bool(state.pop("done", False))
                return {"job": name, "requested_at": requested_at, **state,
                        "outcome": state.get("outcome") if done else None}  # fmt: skip
            await asyncio.sleep(0.05)

    async def statistics(self) -> dict[str, Any]:
        async with self.pool.connection(timeout=1.0) as conn:
            row = await (await conn.execute(_STATISTICS)).fetchone()
        keys = ("statistics", "refreshed_at", "epoch", "instance_id")
        return dict(zip(keys, row, strict=True)) if row else {"statistics": {}}

    # -- what the HTTP surface reports ----------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        if self.shutting_down:
            return False, "shutting_down"

        if not self.spool.can_accept()[0]:  # full, or not writable: would answer 503
            return False, "spool_unavailable"
        try:
            async with self.pool.connection(timeout=1.0) as conn:
                missing = await asyncio.wait_for(pending(conn), 1.0)
        except (*DATABASE_UNAVAILABLE, TimeoutError):
            return False, "database_unreachable"
        if missing:
            return False, "migrations_missing"
        if self.halt_mode == "rewound":  # it takes and keeps signals: it stays in the pool
            return True, "database_rewound"
        return True, "ready"

    async def leader_view(self) -> dict[str, Any]:
        """The leader by the database (None when it cannot be asked) and this instance."""
        stats = self.stats()
        row: dict[str, Any] | None = None
        with contextlib.suppress(*DATABASE_UNAVAILABLE, TimeoutError):
            async with self.pool.connection(timeout=1.0) as conn:
                cur = await conn.execute(_ELECTION_LEADER, [self.config.election])
                found = await cur.fetchone()
                if found is not None:
                    keys = ("epoch", "leader", "host", "lock_held", "heartbeat_age_s")
                    row = dict(zip(keys, found, strict=True))
        trading: dict[str, Any] = {"settings_fingerprint": self.settings_fingerprint}
        with contextlib.suppress(*DATABASE_UNAVAILABLE, TimeoutError):
            trading["halt"] = await self.trading_halt()
            async with self.pool.connection(timeout=1.0) as conn:
                trading["disagreeing_instances"] = await self._disagreeing(conn)
        return {
            "election": self.config.election,
            "leader": row,
            "trading": trading,
            "instance_id": self.config.instance_id,
            "is_leader": self.elector.is_leader,
            "epoch": self.elector.epoch,
            "eligible": self.elector.eligible,
            "priority": self.elector.priority,
            "metrics": {key: stats[key] for key in _LEADER_VIEW_METRICS},
        }

    def stats(self) -> dict[str, Any]:
        """Every figure of this instance, from memory only: no query, so /metrics
        answers at once while the database is down."""
        election = self.elector.stats
        latency = self.elector.last_heartbeat_latency
        spool = self.spool.stats()
        return {
            "is_leader": self.elector.is_leader,
            "epoch": self.elector.epoch,
            "heartbeats_ok": election["heartbeats_ok"],
            "heartbeats_failed": election["heartbeats_failed"],
            "heartbeat_latency_ms": None if latency is None else round(latency * 1000, 3),
            "leadership_changes": election["elected"] + election["demoted"],
            "times_elected": election["elected"],
            "spooled": spool["records"],
            "spool": spool,
            "answers": dict(self.responses),
            "webhooks_invalid": self.refusals.total,
            "executions": dict(self.executor.counts),
            "execution_batches": dict(self.executor.batch_stats),
            "inbox_writes": dict(self.inbox.stats),
            "inbox_write_seconds": self.inbox.write_seconds,
            "trading_halt": self.halt_mode,
            "last_reconciliation": (self.reconciler.last or {}).get("outcome"),
            "jobs": self.jobs.stats(),
            # deliveries (an event for a sink) this instance delivered; attempts that failed
            "alert_deliveries": dict(self.alerts.stats),
            "open_signals": self.open_signals,
            "open_signals_age": None
            if self.open_signals is None
            else time.monotonic() - self.open_signals_at,
            "oldest_open_signal": dict(self.oldest_open),
            "pool": self.pool.get_stats(),
            "received_to_executed": self.executor.received_to_executed,
            "broker": {
                "calls": self.metered_broker.calls,
                "orders": self.metered_broker.orders,
                "seconds": self.metered_broker.seconds,
            },
            # Redis commands by (operation, outcome); None: no Redis configured
            "redis": None if self.redis is None else dict(self.redis.counts),
        }

    async def find_signal(self, signal_id: int) -> dict[str, Any] | None:
        """A signal with its orders; None when there is no such signal. Raises one of
        DATABASE_UNAVAILABLE when the database cannot be asked."""
        async with self.pool.connection(timeout=1.0) as conn:
            return await get_signal(conn, signal_id)

    async def transfer(self, to: str) -> int:
        """Hand leadership to instance `to`: name it (only it may take over for a while),
        let the executions under way end (a lease at most), resign. The epoch given up.
        Raises NotLeader when this instance does not lead, TransferRefused (the reason)
        when `to` is unknown, not alive or may not lead, or one of DATABASE_UNAVAILABLE."""
        epoch = self.elector.require_epoch()
        lease = self.config.timings.lease
        await self.elector.transfer(to, timeout=3 * lease)
        return epoch

    async def _drain_for_transfer(self) -> None:
        """Before a switchover's resign: the executions under way end first, so the
        successor has nothing to settle with the broker."""
        await self.executor.drain(min(self.config.shutdown_timeout, self.config.timings.lease))

    async def resign(self, reason: str) -> int | None:
        """Give up leadership at once (a follower takes over); the epoch given up,
        or None when this instance does not lead."""
        epoch = self.elector.epoch
        if epoch is not None:
            # An alert under way ends and is recorded first: the successor need not repeat it.
            await self.alerts.drain(min(2.0, self.config.timings.lease))
        resigned = False
        try:
            resigned = await self.elector.resign(reason, timeout=self.config.timings.lease)
        finally:
            if not resigned:
                self.alerts.resume()
        return epoch if resigned else None


def _public_url(config: ServiceConfig) -> str | None:
    """The public listener's URL, as the leader publishes it in Redis; None when it
    listens on every address (0.0.0.0, ::), which names no address to reach it at."""
    try:
        address = ipaddress.ip_address(config.host)
    except ValueError:
        return f"http://{config.host}:{config.port}"  # a host name
    if address.is_unspecified:
        return None
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{config.port}"


def _broker(config: ServiceConfig, pool: AsyncConnectionPool[Any]) -> Broker:
    if config.broker == "openalgo":
        return OpenAlgoBroker(
            config.openalgo_url,
            config.openalgo_api_key,
            strategy=config.openalgo_strategy,
            mode="live" if config.openalgo_mode == "live" else "analyze",
            order_rate=config.openalgo_order_rate,
            timeout=config.broker_timeout,
        )
    return PaperBroker(pool)


async def _require_migrated(dsn: str) -> None:
    """Under --no-migrate, a database that lacks migrations is one clear error at start,
    not a sweep failing every second (run `pgleader migrate` as the schema's owner)."""
    async with await connect(dsn, autocommit=True) as conn:
        missing = await pending(conn)
    if missing:
        names = ", ".join(m.label for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise SchemaMissing(
            f"the database lacks {len(missing)} migration(s) ({names}) and --no-migrate"
            " forbids applying them: run `pgleader migrate` first"
        )


async def _wait_for_database(dsn: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    attempt = 0
    while True:
        try:
            conn = await connect(dsn)
            await conn.close()
            return
        except DatabaseUnavailable as exc:
            if any(marker in str(exc) for marker in _PERMANENT):
                raise
            attempt += 1
            pause = backoff(attempt, base=0.2, cap=5.0, jitter=0.2)
            if time.monotonic() + pause > deadline:
                raise DatabaseUnavailable(f"{exc} (gave up after {limit:.0f} s)") from None
            log.warning(
                "database not reachable yet; retrying", error=str(exc), retry_in=round(pause, 2)
            )
            await asyncio.sleep(pause)


async def _writable(conn: psycopg.AsyncConnection[Any]) -> None:
    """The pool's reset of a connection given back, with no round trip: a server that
    turned read-only (in recovery, or an old primary fenced with
    default_transaction_read_only) said so in a ParameterStatus message with its last
    answer (PostgreSQL 14+ reports both). Raising drops the connection: the next is a
    new one (a multi-host DSN's target_session_attrs=read-write then finds the primary),
    and meanwhile a write refused as read-only is the database being unavailable (the
    webhook spools)."""
    for name in ("in_hot_standby", "default_transaction_read_only"):
        if conn.info.parameter_status(name) == "on":
            raise psycopg.OperationalError(f"the server is read-only ({name} is on)")


async def _reconnect_failed(pool: AsyncConnectionPool[Any]) -> None:
    """A pool slot gave up reconnecting (every _RECONNECT_WINDOW s of an outage): a new
    attempt starts now (check() grows a pool short of connections), not when a request
    next needs a connection, which a quiet instance may not make for seconds."""
    if pool.closed:
        return
    log.debug("pool reconnection window over; trying again", pool=pool.name)
    try:
        await pool.check()
    except Exception as exc:  # in the pool's worker, which only a client error may leave
        log.warning("pool check after a failed reconnection failed", error=first_line(exc))
