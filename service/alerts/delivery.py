"""The leader's delivery of alerts and leadership transitions to the alert sinks.

Every delivery (an event for a sink) is a row of gateway.alert_deliveries:
gateway.raise_alert queues an alert for every enabled sink in its own
transaction, and the leader, when elected, records the sinks it is configured
with and queues the transitions not yet queued (sql/gateway/functions.sql). So an
event raised while nobody leads waits for the next leader, and a failover loses
none.

While it leads, one loop per sink claims what is due (a fenced statement: attempts
+ 1, the epoch), sends it outside any transaction with a timeout, and records the
outcome. The claim gives a sink at most one message per group interval: whatever
came meanwhile goes out as one grouped message, so a flapping cluster does not
flood a chat. A delivery claimed by a leader that died before recording the
outcome, or sent without an answer, is sent again marked as a repeat: the only way
one arrives twice. Woken by NOTIFY (the gateway's listener calls `wake`) and by a
short poll. It uses the pool for a statement at a time and never holds a
connection while it waits for a sink: execution is never kept waiting by it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, Transition
from pgleader.errors import Fenced, NotLeader, backoff, first_line
from pgleader.fencing import fenced_statement
from service.alerts.messages import Event, render
from service.alerts.sinks import Sent, Sink
from service.queries import QUERIES

__all__ = ["AlertDelivery"]

log = structlog.get_logger("service.alerts")

_START = QUERIES["start_alert_delivery"]
_CLAIM = QUERIES["claim_alert_deliveries"]
_FINISH = QUERIES["finish_alert_deliveries"]


class AlertDelivery:
    """Delivers to `sinks` while `elector` leads; counts what this instance delivered
    and the delivery attempts that failed (`stats`)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        elector: Elector,
        sinks: Sequence[Sink],
        *,
        group_interval: float = 10.0,
        poll: float = 1.0,
        retry_base: float = 1.0,
        give_up_after: int = 3,
        batch: int = 20,
        send_timeout: float = 10.0,
    ) -> None:
        self.pool = pool
        self.elector = elector
        self.sinks = list(sinks)
        self.group_interval = group_interval
        self.poll = poll
        self.retry_base = retry_base
        self.give_up_after = give_up_after
        self.batch = batch
        self.send_timeout = send_timeout
        self.stats = {"delivered": 0, "failed": 0}
        self._wakes = {sink.name: asyncio.Event() for sink in self.sinks}
        self._lead_task: asyncio.Task[None] | None = None
        self._paused = False  # claim nothing until elected again (a resign under way)
        self._closed = False  # shut down: never lead again
        self._log = log.bind(election=elector.election, instance=elector.instance_id)
        elector.on_transition(self._on_transition)

    def wake(self) -> None:
        """Look for due deliveries now (a NOTIFY of a new alert or transition)."""
        for event in self._wakes.values():
            event.set()

    async def drain(self, timeout: float, *, final: bool = False) -> None:
        """Claim nothing more (until elected again; never again when `final`), and give
        a send under way `timeout` s to end and be recorded: a resign or a shutdown
        then leaves no delivery for the successor to repeat."""
        self._paused = True
        self._closed = self._closed or final
        self.wake()
        if self._lead_task is not None:
            await asyncio.wait({self._lead_task}, timeout=timeout)

    def resume(self) -> None:
        """After a drain that did not end the leadership (a resign refused): go on."""
        epoch = self.elector.epoch
        if self._paused and not self._closed and epoch is not None:
            self._stop_leading()
            self._paused = False
            self._lead_task = asyncio.create_task(self._lead(epoch), name="gateway-alerts")

    async def stop(self) -> None:
        self._closed = True
        task = self._lead_task
        self._stop_leading()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- leading -----------------------------------------------------------------

    def _on_transition(self, t: Transition) -> None:
        self._stop_leading()
        if t.kind == "elected" and not self._closed:
            self._paused = False
            self._lead_task = asyncio.create_task(self._lead(t.epoch), name="gateway-alerts")

    def _stop_leading(self) -> None:
        """Demoted: stop at once (a send under way may arrive; its successor repeats it)."""
        if self._lead_task is not None:
            self._lead_task.cancel()
            self._lead_task = None

    async def _lead(self, epoch: int) -> None:
        if not await self._start(epoch) or not self.sinks:
            return
        timeout = aiohttp.ClientTimeout(total=self.send_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._serve(sink, epoch, session) for sink in self.sinks))

    def _leading(self, epoch: int) -> bool:
        return self.elector.epoch == epoch and not (self._paused or self._closed)

    async def _start(self, epoch: int) -> bool:
        """Record this leader's sinks and queue the transitions (retried while leading)."""
        names = [sink.name for sink in self.sinks]
        attempt = 0
        while self._leading(epoch):
            try:
                async with self.pool.connection() as conn:
                    with fenced_statement(self.elector.election, epoch):
                        cur = await conn.execute(
                            _START, [self.elector.election, epoch, self.elector.instance_id, names]
                        )
                        row = await cur.fetchone()
                if names:
                    self._log.info("alert delivery started", sinks=names,
                                   transitions_queued=row[0] if row else 0)  # fmt: skip
                return True
            except (Fenced, NotLeader):
                return False
            except Exception as exc:
                attempt += 1
                wait = backoff(attempt, base=self.poll, cap=30.0, jitter=0.2)
                self._log.warning("alert delivery cannot start; will retry",
                                  error=first_line(exc), retry_in=round(wait, 2))  # fmt: skip
                await asyncio.sleep(wait)
        return False

    async def _serve(self, sink: Sink, epoch: int, session: aiohttp.ClientSession) -> None:
        wake = self._wakes[sink.name]
        failures = 0
        while self._leading(epoch):
            wait = self.poll
            wake.clear()
            try:
                events = await self._claim(sink, epoch)
                if events:
                    message = render(events, election=self.elector.election,
                                     sender=self.elector.instance_id, epoch=epoch)  # fmt: skip
                    sent = await sink.send(session, message)
                    await self._finish(sink, epoch, events, sent)
                failures = 0
            except (Fenced, NotLeader):
                return
            except Exception as exc:  # an outage, or worse: retry while leading
                failures += 1
                wait = backoff(failures, base=self.poll, cap=30.0, jitter=0.2)
                self._log.warning("alert delivery: cannot claim or record; will retry",
                                  sink=sink.name, error=sink.scrub(first_line(exc)),
                                  retry_in=round(wait, 2))  # fmt: skip
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await wake.wait()

    async def _claim(self, sink: Sink, epoch: int) -> list[Event]:
        election = self.elector.election
        params = [election, epoch, self.elector.instance_id, sink.name, self.group_interval,
                  self.batch]  # fmt: skip
        async with self.pool.connection() as conn:
            with fenced_statement(election, epoch):
                cur = await conn.execute(_CLAIM, params)
                rows = await cur.fetchall()
        return [Event.from_row(row) for row in rows]

    async def _finish(self, sink: Sink, epoch: int, events: list[Event], sent: Sent) -> None:
        """Record the outcome (retrying through a short outage while leading: a send
        left unrecorded is repeated by the next claim)."""
        ids = [e.delivery_id for e in events]
        retry = sent.retry_after if sent.retry_after is not None else self.retry_base
        params = [epoch, self.elector.instance_id, sink.name, ids, sent.outcome, sent.detail,
                  retry, self.give_up_after]  # fmt: skip
        key = "delivered" if sent.outcome == "delivered" else "failed"
        self.stats[key] += len(ids)
        fields = {"sink": sink.name, "deliveries": len(ids), "outcome": sent.outcome,
                  "detail": sent.detail, "repeat": any(e.repeat for e in events)}  # fmt: skip
        if sent.outcome == "delivered":
            self._log.info("alert delivered", **fields)
        elif sent.outcome == "rate_limited":
            self._log.warning("alert delivery rate limited", retry_after=retry, **fields)
        else:  # retried with backoff (a refusal: a few times)
            self._log.warning("alert delivery failed", **fields)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.pool.connection() as conn:
                    cur = await conn.execute(_FINISH, params)
                    row = await cur.fetchone()
                break
            except Exception as exc:
                if self.elector.epoch != epoch or attempt >= 5:
                    self._log.error("alert delivery not recorded: it will be sent again",
                                    sink=sink.name, error=first_line(exc))  # fmt: skip
                    return
                await asyncio.sleep(backoff(attempt, base=0.2, cap=2.0, jitter=0.2))
        given_up = int(row[0]) if row else 0
        if given_up:
            self._log.error("alert delivery given up: the sink refuses it", sink=sink.name,
                            deliveries=given_up, detail=sent.detail)  # fmt: skip
