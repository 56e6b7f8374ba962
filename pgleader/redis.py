"""Redis beside an election, as a cache that never decides anything.

PostgreSQL stays the only truth: what is read from Redis may be missing, late,
stale or wrong, and nothing built on this module may depend on it for safety.
`RedisLink` is one client used that way: every command bounded by a short timeout
(a paused or vanished Redis costs a caller at most that), never retried, never
raised (a failure is counted, logged at most every 30 s, and the caller goes on as
if Redis were absent), and after a failure left alone for a second. `LeaderPublisher`
publishes who leads an election (`{prefix}:{election}:leader`, JSON
`{"leader", "epoch", "url"}`) with a TTL of one lease, refreshed every heartbeat
while the elector leads, and removed when it stops leading if it still names this
epoch: consumers may find the leader without PostgreSQL, as a hint.

The `redis` package (redis-py) is optional (`pip install 'pgleader[redis]'`):
imported here only when a link is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import structlog

from pgleader.election import Elector, Transition
from pgleader.errors import ConfigError, first_line

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["LeaderPublisher", "RedisLink", "describe_redis_url", "redis_url_problem"]

log = structlog.get_logger("pgleader.redis")

T = TypeVar("T")

INSTALL = "pip install 'pgleader[redis]'"
_SCHEMES = ("redis", "rediss", "unix")
# A command's bound, s: a healthy local Redis answers in well under a millisecond.
DEFAULT_TIMEOUT = 0.25
# After a failure, commands are skipped for this long (a dead Redis is not asked
# again by every caller), and a warning is logged at most this often.
_REST = 1.0
_WARN_EVERY = 30.0
# Delete the key only if it still holds exactly what this leader wrote (its epoch):
# a successor's key is never removed.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def redis_url_problem(url: str) -> str | None:
    """What makes `url` unusable, in words that never repeat it (it may carry a
    password): not a redis URL, or the redis package is missing. None: usable."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        return "not a redis://, rediss:// or unix:// URL"
    if parts.scheme not in _SCHEMES or not (parts.hostname or parts.path):
        return "not a redis://, rediss:// or unix:// URL"
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return f"the redis package is not installed: {INSTALL}"
    return None


def describe_redis_url(url: str) -> str:
    """scheme://host:port/db of a Redis URL, without user or password, for logs."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable Redis URL>"
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{parts.hostname or ''}:{port or 6379}{parts.path or '/0'}"


class RedisLink:
    """One Redis client for a cache: commands bounded, counted, never raised.

    `counts` holds the commands by (operation, outcome): `ok` (or what the caller
    named, such as `hit` and `miss`), `error`, `timeout`, `skipped` (not sent: Redis
    failed less than a second ago)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        problem = redis_url_problem(url)
        if problem is not None:
            raise ConfigError(f"Redis URL: {problem}")
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.where = describe_redis_url(url)
        self.timeout = timeout
        password = urlsplit(url).password
        self._secrets = [s for s in (url, password, password and unquote(password)) if s]
        pool = aioredis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a second try would only double the wait
            max_connections=64,  # beyond: refused at once, never queued
        )
        self.client: Redis = aioredis.Redis(connection_pool=pool)
        self.counts: dict[tuple[str, str], int] = {}
        self._resting_until = 0.0
        self._failing = False
        self._warned_at = -math.inf

    async def call(
        self,
        operation: str,
        command: Callable[[Redis], Awaitable[T]],
        outcome: Callable[[T], str] | None = None,
    ) -> T | None:
        """`command(client)`'s result, or None when Redis failed, was too slow or is
        resting after a failure. Never raises (but a cancellation)."""
        if time.monotonic() < self._resting_until:
            self.count(operation, "skipped")
            return None
        try:
            # The socket timeouts bound each read; this bounds the whole command.
            async with asyncio.timeout(self.timeout * 1.2):
                result = await command(self.client)
        except Exception as exc:
            timed_out = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
            self._failed(operation, "timeout" if timed_out else "error", exc)
            return None
        self.count(operation, outcome(result) if outcome is not None else "ok")
        if self._failing:
            self._failing = False
            log.info("redis reachable again", redis=self.where)
        return result

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout):
                close = getattr(self.client, "aclose", None) or self.client.close
                await close()

    def count(self, operation: str, outcome: str) -> None:
        """Count one operation by its outcome (for what a caller decides itself)."""
        key = (operation, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def _failed(self, operation: str, outcome: str, exc: BaseException) -> None:
        self.count(operation, outcome)
        now = time.monotonic()
        self._resting_until = now + _REST
        self._failing = True
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "redis unavailable: going on without it", redis=self.where,
                operation=operation, outcome=outcome, error=self.redact(first_line(exc)),
            )  # fmt: skip

    def redact(self, text: str) -> str:
        """`text` with the URL's password (and the URL itself) replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def __repr__(self) -> str:
        return f"<RedisLink {self.where}>"


class LeaderPublisher:
    """Keeps `{prefix}:{election}:leader` naming this instance while its elector
    leads: set with a TTL of one lease on election and every heartbeat after,
    deleted (only if it still holds this epoch) on demotion or resignation.

    A hint for consumers, never read back: a paused process may briefly leave its
    old entry, which expires within a lease or is overwritten on the successor's
    next heartbeat."""

    def __init__(
        self, link: RedisLink, elector: Elector, *, url: str | None = None,
        prefix: str = "pgleader",
    ) -> None:  # fmt: skip
        self.link = link
        self.elector = elector
        self.url = url
        self.key = f"{prefix}:{elector.election}:leader"
        self._published: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        elector.on_transition(self._changed)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"redis-leader:{self.key}")

    async def stop(self) -> None:
        """Stop publishing; remove the entry if it still names this instance's epoch."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._published is not None and self.elector.epoch is None:
            await self._release(self._published)

    def _changed(self, transition: Transition) -> None:
        self._wake.set()  # never awaited here: a slow Redis never holds up the elector

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            epoch = self.elector.epoch
            if epoch is not None:
                await self._publish(epoch)
            elif self._published is not None:
                await self._release(self._published)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.elector.timings.heartbeat):
                    await self._wake.wait()

    async def _publish(self, epoch: int) -> None:
        value = json.dumps(
            {"leader": self.elector.instance_id, "epoch": epoch, "url": self.url},
            separators=(",", ":"),
        )
        self._published = value  # even if the write fails: it may have landed
        ttl_ms = max(1, int(self.elector.timings.lease * 1000))
        await self.link.call("publish_leader", lambda r: r.set(self.key, value, px=ttl_ms))

    async def _release(self, value: str) -> None:
        def release(r: Redis) -> Awaitable[Any]:
            return r.eval(_RELEASE, 1, self.key, value)

        if await self.link.call("release_leader", release) is not None:
            self._published = None
