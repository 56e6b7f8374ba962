"""The one alert that cannot wait for the database: the database itself is away.

Alerts are delivered by the leader from the database (service/alerts/delivery.py),
so while PostgreSQL is unreachable nobody is told, and nobody leads. Each instance
therefore watches its own sweep (which reaches the database every second): once it
has failed for `after` seconds in a row, the instance sends its sinks a message of
its own, straight over HTTP, saying what it does meanwhile (webhooks are spooled,
nothing executes); once the database answers again, a second message says so.

One message per outage and instance (every instance that sees the outage says so:
there is no database to agree through), tried again every `retry` seconds until a
sink took it. Nothing here is stored: the outage is in the logs and the spool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import structlog

from service.alerts.messages import direct_message
from service.alerts.sinks import Sink, send_to_each

__all__ = ["OutageAlarm"]

log = structlog.get_logger("service.alerts.outage")

KIND_DOWN = "database_unreachable"
KIND_BACK = "database_reachable"


class OutageAlarm:
    def __init__(
        self,
        sinks: Sequence[Sink],
        instance_id: str,
        *,
        after: float,
        send_timeout: float,
        retry: float = 30.0,
        spooled: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sinks, self.instance_id = list(sinks), instance_id
        self.after, self.send_timeout, self.retry = after, send_timeout, retry
        self.spooled, self.clock = spooled, clock
        self.down_since: float | None = None
        self.told = False  # a sink took this outage's database_unreachable
        self._back_due: float | None = None  # the outage's length, to tell once it is over
        self._tried_at: float | None = None
        self._sending: asyncio.Task[None] | None = None
        self.sent: list[str] = []  # kinds a sink took, for tests

    def observe(self, reachable: bool) -> None:
        """Called after every sweep (each second): whether it reached the database.
        database_unreachable goes once the outage is `after` old, database_reachable once
        it is over and the first was taken; each is tried every `retry` s until a sink
        takes it (a send under way is waited for: the second never overtakes the first)."""
        now = self.clock()
        if reachable and self.down_since is not None:
            self._back_due = now - self.down_since
            self.down_since, self._tried_at = None, None
        elif not reachable and self.down_since is None:
            self.down_since, self.told, self._back_due, self._tried_at = now, False, None, None
        if self._sending is not None and not self._sending.done():
            return
        if self._tried_at is not None and now - self._tried_at < self.retry:
            return
        if self.down_since is not None:
            if not self.told and now - self.down_since >= self.after:
                self._send(KIND_DOWN, self._down_text(now - self.down_since), now)
        elif self._back_due is not None:
            if self.told:
                self._send(KIND_BACK, self._back_text(self._back_due), now)
            else:
                self._back_due = None  # the first never arrived: nothing to take back

    async def close(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)

    def _send(self, kind: str, text: str, now: float) -> None:
        if not self.sinks:
            return
        self._tried_at = now
        self._sending = asyncio.create_task(self._deliver(kind, text), name=f"outage-{kind}")

    async def _deliver(self, kind: str, text: str) -> None:
        severity = "critical" if kind == KIND_DOWN else "info"
        message = direct_message(kind, severity, kind, text, self.instance_id)
        results = await send_to_each(self.sinks, message, self.send_timeout)
        took = [
            s.name for s, r in zip(self.sinks, results, strict=True) if r.outcome == "delivered"
        ]
        if took:
            self.sent.append(kind)
            self._tried_at = None
            if kind == KIND_DOWN:
                self.told = True
            else:
                self.told, self._back_due = False, None
        log.warning("outage message sent" if took else "outage message not delivered",
                    kind=kind, delivered_to=took,
                    errors={s.name: r.detail for s, r in zip(self.sinks, results, strict=True)
                            if r.outcome != "delivered"})  # fmt: skip

    def _down_text(self, seconds: float) -> str:
        return (
            f"{self.instance_id} has not reached PostgreSQL for {seconds:.0f} s. It answers"
            f" webhooks 202 and keeps them in its spool ({self.spooled()} now); nothing is"
            " executed and no other alert is delivered until the database is back."
            " Sent by this instance itself: the leader delivers alerts from the database."
        )

    def _back_text(self, seconds: float) -> str:
        return (
            f"{self.instance_id} reaches PostgreSQL again after {seconds:.0f} s: its spool"
            f" ({self.spooled()} now) replays, and the leader executes and alerts as usual."
        )
