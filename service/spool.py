"""The outage spool: signals accepted while PostgreSQL was unreachable.

One JSON line per signal, appended and fsynced before the webhook answers 202,
so an accepted signal survives a crash of this instance. Replay inserts each
line into the inbox (idempotent: the fingerprint is unique) and empties the
file only after every line is in. A torn last line can only come from a crash
during the append, i.e. before any answer was sent: it is skipped and logged.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

__all__ = ["Spool", "SpoolError"]

log = structlog.get_logger("service.spool")


class SpoolError(Exception):
    """The spool could not be written: the signal is NOT safe (answer 5xx)."""


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        try:
            with self.path.open("rb") as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    async def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, line)
            except OSError as exc:
                raise SpoolError(f"cannot write the spool {self.path}: {exc.strerror}") from exc

    def _append(self, line: bytes) -> None:
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # make the new directory entry durable too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def replay(self, store: Callable[[dict[str, Any]], Awaitable[object]]) -> int:
        """Store every spooled record, then empty the spool. Raises (keeping the file)
        when `store` fails; returns how many records were stored."""
        async with self._lock:
            try:
                raw = await asyncio.to_thread(self.path.read_bytes)
            except FileNotFoundError:
                return 0
            records = []
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    log.error("skipping a torn spool line", path=str(self.path), line=number)
            for record in records:
                await store(record)
            await asyncio.to_thread(self._truncate)
            return len(records)

    def _truncate(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
