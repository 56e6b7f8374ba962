"""Group commit: the items of concurrent callers share one write.

One write is in flight at a time; what arrives meanwhile goes in the next, up to `cap`
items a write. Each caller waits for the outcome of its own item. The inbox groups its
INSERTs this way, the spool its appends and fsyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["GroupWriter"]

T = TypeVar("T")
R = TypeVar("R")


class GroupWriter(Generic[T, R]):
    """`write(items)` returns one outcome per item, in order: a result, or the exception
    that item's caller raises; an exception it raises is every item's outcome.
    `stopped()` is the exception of the items left when the writer is cancelled."""

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        cap: int,
        name: str,
        stopped: Callable[[], BaseException],
    ) -> None:
        self._write = write
        self.cap = cap
        self._name = name
        self._stopped = stopped
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The outcome of `item`'s write: its result, or what it raised."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._queue.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all(), name=self._name)
        # shield: a caller that goes away must not cancel a write others share
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Wait for the writes under way (new ones still start)."""
        while self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[: self.cap], self._queue[self.cap :]
                outcomes: Sequence[R | BaseException]
                try:
                    outcomes = await self._write([item for item, _ in batch])
                except Exception as exc:
                    outcomes = [exc] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
        finally:
            self._writer = None
            # Only if this task was cancelled (loop shutdown): nobody may wait forever.
            for _, future in [*batch, *self._queue]:
                _settle(future, self._stopped())


def _settle(future: asyncio.Future[R], outcome: R | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _retrieve(future: asyncio.Future[R]) -> None:
    """Mark the outcome seen: the caller that waited for it may have gone."""
    if not future.cancelled():
        future.exception()
