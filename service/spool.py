"""The outage spool: signals accepted while PostgreSQL was unreachable.

One JSON line per signal, appended and fsynced before the webhook answers 202,
so an accepted signal survives a crash of this instance. Each instance appends
to its own file in the spool directory; replay takes every file there (an
instance restarted under a new id still finds what its predecessor spooled),
inserts each line into the inbox (idempotent: the fingerprint is unique) and
empties the file only after every line is in. Appends and replays hold an
exclusive flock on the file, so they never interleave, across processes too.
A torn last line can only come from a crash during its append, i.e. before any
answer was sent: it is skipped and logged.
"""

from __future__ import annotations

import asyncio
import fcntl
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
        self.directory = path.parent
        self._lock = asyncio.Lock()

    def __len__(self) -> int:
        """Records waiting in every file of the spool directory."""
        total = 0
        for file in self._files():
            try:
                with file.open("rb") as f:
                    total += sum(1 for line in f if line.strip())
            except FileNotFoundError:
                continue
        return total

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.glob("*.jsonl"))
        except OSError:
            return []

    async def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        async with self._lock:
            try:
                await asyncio.to_thread(self._append, line)
            except OSError as exc:
                raise SpoolError(f"cannot write the spool {self.path}: {exc.strerror}") from exc

    def _append(self, line: bytes) -> None:
        new_dir = not self.directory.exists()
        new_file = new_dir or not self.path.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
        # make new directory entries durable too
        if new_dir:
            _fsync_dir(self.directory.parent)
        if new_file:
            _fsync_dir(self.directory)

    async def replay(self, store: Callable[[dict[str, Any]], Awaitable[object]]) -> int:
        """Store every spooled record, then empty its file. Raises (keeping the file)
        when `store` fails; returns how many records were stored."""
        stored = 0
        async with self._lock:
            for file in self._files():
                stored += await self._replay_file(file, store)
        return stored

    async def _replay_file(
        self, file: Path, store: Callable[[dict[str, Any]], Awaitable[object]]
    ) -> int:
        try:
            fd = os.open(file, os.O_RDWR)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its owner is appending right now; next sweep
            raw = await asyncio.to_thread(_read_all, fd)
            records = []
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    log.error("skipping a torn spool line", path=str(file), line=number)
            for record in records:
                await store(record)
            await asyncio.to_thread(_truncate, fd)
            return len(records)
        finally:
            os.close(fd)


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _truncate(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
