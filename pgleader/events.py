"""LISTEN/NOTIFY: the pgleader_events payload and a listener that survives disconnects.

NOTIFY is delivered only on commit and nothing is replayed after a disconnect,
so `listen` yields a `Reconnected` marker after every reconnection: a consumer
that must not miss work pairs it with a sweep.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgleader.connect import connect
from pgleader.errors import DatabaseUnavailable, backoff
from pgleader.queries import QUERIES

__all__ = [
    "EVENTS_CHANNEL", "Notification", "Reconnected", "describe_event", "listen", "parse_event",
]  # fmt: skip

EVENTS_CHANNEL = "pgleader_events"
_PING = QUERIES["ping"]


@dataclass(frozen=True, slots=True)
class Notification:
    channel: str
    payload: str


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The listener (re)connected; notifications may have been missed before it."""

    attempt: int


def parse_event(payload: str) -> dict[str, Any]:
    """A pgleader_events payload as a dict (keys: event, election, epoch, leader, previous, at)."""
    data = json.loads(payload)
    if not isinstance(data, dict):
        raise ValueError("event payload is not a JSON object")
    return data


def describe_event(event: dict[str, Any]) -> str:
    """A pgleader_events payload in words, for `pgleader watch --human`: the
    transitions the election announces, a failed job, an alert; any other event as
    its fields."""
    kind = event.get("event")
    of = f" of {event['election']}" if event.get("election") else ""
    epoch = f"epoch {event.get('epoch')}"
    if kind == "elected":
        previous = f", previous {event['previous']}" if event.get("previous") else ""
        return f"{event.get('leader')} elected leader{of} ({epoch}{previous})"
    if kind == "resigned":
        return f"{event.get('previous')} resigned the lead{of} ({epoch})"
    if kind == "lost":
        return f"{event.get('previous')} lost the lead{of} ({epoch}: its session ended)"
    if kind == "evicted" and event.get("epoch") is None:
        return (f"{event.get('previous')} evicted{of} by {event.get('leader')}"
                " (it was granted the lock and stopped before it led)")  # fmt: skip
    if kind == "evicted":
        return (f"{event.get('previous')} evicted from the lead{of} by {event.get('leader')}"
                f" ({epoch}: it stopped beating)")  # fmt: skip
    if kind == "job_failed":
        return (f"job {event.get('job')}{of} {event.get('outcome')}"
                f" ({epoch}, {event.get('failures')} failure(s) in a row)")  # fmt: skip
    rest = ", ".join(
        f"{k} {v}" for k, v in event.items()
        if k not in ("event", "at", "kind", "detail") and v is not None
    )  # fmt: skip
    if kind == "alert":
        text = f"ALERT {event.get('kind')}: {event.get('detail') or ''}"
    else:
        text = " ".join([str(kind), *(f"{k} {event[k]}" for k in ("kind", "detail") if k in event)])
    return " ".join(f"{text} ({rest})".split() if rest else text.split())


async def listen(
    dsn: str,
    *channels: str,
    ping_every: float = 5.0,
    max_backoff: float = 5.0,
    application_name: str = "pgleader:listen",
) -> AsyncGenerator[Notification | Reconnected, None]:
    """Yield notifications on `channels` forever, reconnecting with backoff.

    A cheap query every `ping_every` seconds of silence proves the connection
    is alive (a half-open TCP connection otherwise looks like a quiet channel).
    """
    channels = channels or (EVENTS_CHANNEL,)
    attempt = 0
    while True:
        try:
            conn = await connect(dsn, autocommit=True, application_name=application_name[:63])
        except DatabaseUnavailable:
            attempt += 1
            await asyncio.sleep(backoff(attempt, base=0.1, cap=max_backoff))
            continue
        try:
            for channel in channels:
                await conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
            yield Reconnected(attempt)
            attempt = 0
            while True:
                async for n in conn.notifies(timeout=ping_every):
                    yield Notification(n.channel, n.payload)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that lands as the ping returns, and the loop lives on.
                async with asyncio.timeout(ping_every):
                    await conn.execute(_PING)
        except (psycopg.OperationalError, TimeoutError):
            attempt += 1
            await asyncio.sleep(backoff(attempt, base=0.1, cap=max_backoff))
        finally:
            await conn.close()
