"""The status page's feed: one snapshot of everything the page shows, pushed to
every open page when something changes.

A snapshot is one statement (`status_snapshot`: the election, the instances with
their heartbeat age, 24 hours of leadership, recent signals with their orders,
open positions, alerts, the kill switch, the last reconciliation, the jobs), as
JSON. While at least one page is open, the feed LISTENs on pgleader_events
(elections, resignations, alerts) and gateway_signals (a signal stored, the kill
switch, a reconciliation asked for) and pushes a fresh snapshot shortly after each
burst of notifications, once more a moment later (an inline execution ends without
a notification of its own), and every REFRESH_S seconds (heartbeat ages; a
database that went away shows as an error instead of a frozen page). The page
never polls. With no page open, the feed holds no connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader.errors import first_line
from pgleader.events import EVENTS_CHANNEL, listen
from service.errors import DATABASE_UNAVAILABLE
from service.intake.inbox import NOTIFY_CHANNEL
from service.queries import QUERIES

__all__ = ["StatusFeed"]

log = structlog.get_logger("service.status")

_SNAPSHOT = QUERIES["status_snapshot"]
REFRESH_S = 10.0
# After a notification: a snapshot this soon (a burst is one push), and once more later.
_SETTLE_S = (0.1, 1.5)
_QUEUE = 8  # snapshots a slow page may lag behind; older ones are dropped


class StatusFeed:
    def __init__(
        self, pool: AsyncConnectionPool[Any], dsn: str, election: str, instance_id: str,
        stale_after: float,
    ) -> None:  # fmt: skip
        self.pool, self.dsn = pool, dsn
        self.params = {"election": election, "hours": 24, "signals": 25, "alerts": 10,
                       "stale_after": stale_after}  # fmt: skip
        self.instance_id = instance_id
        self._pages: set[asyncio.Queue[str | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._push: asyncio.Task[None] | None = None
        self._closed = False

    async def snapshot(self) -> str:
        """The page's data as a JSON text; {"error": ...} when the database cannot say."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                cur = await conn.execute(_SNAPSHOT, self.params)
                row = await cur.fetchone()
            found: dict[str, Any] = dict(row[0]) if row else {}
        except DATABASE_UNAVAILABLE as exc:
            found = {"error": f"database unreachable: {first_line(exc)}"}
        found["served_by"] = self.instance_id
        return json.dumps(found, default=str)

    def subscribe(self) -> asyncio.Queue[str | None]:
        """A page's queue of snapshots (None: the instance is shutting down)."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(_QUEUE)
        if self._closed:
            queue.put_nowait(None)
            return queue
        self._pages.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="status-feed")
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        self._pages.discard(queue)
        if not self._pages:
            self._cancel()

    def close(self) -> None:
        """Shutting down: every page's stream ends now (a draining instance must not
        wait for pages that never finish)."""
        self._closed = True
        for queue in self._pages:
            _offer(queue, None)
        self._pages.clear()
        self._cancel()

    def _cancel(self) -> None:
        for task in (self._task, self._push):
            if task is not None:
                task.cancel()
        self._task = self._push = None

    async def _run(self) -> None:
        refresh = asyncio.create_task(self._refresh())
        try:
            async for _ in listen(self.dsn, EVENTS_CHANNEL, NOTIFY_CHANNEL,
                                  application_name="gateway:status"):  # fmt: skip
                if self._push is None or self._push.done():
                    self._push = asyncio.create_task(self._settle())
        except Exception as exc:  # the feed must never die silently with pages open
            log.warning("status feed stopped", error=first_line(exc))
        finally:
            refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresh

    async def _settle(self) -> None:
        for delay in _SETTLE_S:
            await asyncio.sleep(delay)
            await self._publish()

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self._publish()

    async def _publish(self) -> None:
        if not self._pages:
            return
        text = await self.snapshot()
        for queue in list(self._pages):
            _offer(queue, text)


def _offer(queue: asyncio.Queue[str | None], item: str | None) -> None:
    """Put without waiting: a page that lags loses its oldest snapshot, not the newest."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
