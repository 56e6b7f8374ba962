"""Fingerprints of stored signals, kept in Redis to answer duplicates during an outage.

Written only after the inbox holds a signal (stored, found a duplicate, or
replayed from the spool), as `pgleader:{election}:fp:{fingerprint}` = its signal
id, with a TTL. Read only when PostgreSQL cannot be asked: a signal whose
fingerprint is there is answered as the duplicate the database would call it,
and is still spooled. Redis changes that answer, never what is kept: with the
database up it is never read, and a missing, slow or wrong entry costs at most a
`spooled` answer where `duplicate` was due (or the reverse; the spool's replay
lets the database decide).

Writes never hold up an answer: they queue (bounded) and go in pipelined
batches from a task of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pgleader.redis import RedisLink

__all__ = ["FingerprintCache"]

# Writes waiting for Redis at most; more are dropped (counted): a cache may forget.
_MAX_WAITING = 10_000
_BATCH = 200


class FingerprintCache:
    def __init__(self, link: RedisLink, election: str, ttl: float) -> None:
        self.link = link
        self.prefix = f"pgleader:{election}:fp:"
        self.ttl_ms = max(1000, int(ttl * 1000))
        self._waiting: dict[str, int] = {}  # fingerprint -> signal id, oldest first
        self._writer: asyncio.Task[None] | None = None

    def remember(self, fingerprint: str, signal_id: int) -> None:
        """Queue the fact that the inbox holds `fingerprint` as `signal_id`."""
        if fingerprint not in self._waiting and len(self._waiting) >= _MAX_WAITING:
            self.link.count("remember_fingerprints", "dropped")
            return
        self._waiting[fingerprint] = signal_id
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name="fingerprint-cache")

    async def lookup(self, fingerprint: str) -> int | None:
        """The signal id Redis holds for `fingerprint`; None when it holds none, holds
        something that is not an id, or cannot be asked within its timeout."""
        key = self.prefix + fingerprint

        def hit_or_miss(value: Any) -> str:
            return "miss" if _signal_id(value) is None else "hit"

        return _signal_id(
            await self.link.call("lookup_fingerprint", lambda r: r.get(key), hit_or_miss)
        )

    async def close(self, timeout: float = 0.5) -> None:
        """Let the queued writes go for at most `timeout` s, then drop the rest."""
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(writer)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    async def _write_all(self) -> None:
        try:
            while self._waiting:
                batch = list(self._waiting.items())[:_BATCH]
                for fingerprint, _ in batch:
                    del self._waiting[fingerprint]
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: list[tuple[str, int]]) -> None:
        async def write(r: Any) -> Any:
            async with r.pipeline(transaction=False) as pipe:  # one round trip
                for fingerprint, signal_id in batch:
                    pipe.set(self.prefix + fingerprint, str(signal_id), px=self.ttl_ms)
                return await pipe.execute()

        await self.link.call("remember_fingerprints", write)


def _signal_id(value: Any) -> int | None:
    """A stored signal id (decimal digits), else None: Redis may hold anything."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19:
        return int(value) or None
    return None
