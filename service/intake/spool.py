"""The outage spool: signals accepted while PostgreSQL was unreachable.

One JSON line per signal (the validated signal, decimals as text, never the
secret), appended and fsynced before the webhook answers 202. An append is all
or nothing: one cut short (disk full, a file-size limit, an I/O error) or one
that would pass the byte cap is undone and raises SpoolError, and the caller
answers 503 (TradingView retries 5xx). Appends and replays hold the file's flock.

Each instance appends to its own file. Replay takes every `*.jsonl` file of the
directory (an instance restarted under a new id finds its predecessor's): once
one of its signals is stored (so nothing moves while the database is away), it
renames the file to `<name>.<ns>.replaying.jsonl` (appends go on in a new one),
stores its lines in bounded chunks (idempotent: the inbox's fingerprint is
unique) and unlinks it once every line is stored. A line that does not parse is
moved to `quarantine/<name>.jsonl` with an alert, never dropped. Alerts wait in
memory until the database takes them. Sizes are known from stat, never by reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import structlog

from pgleader.errors import ConfigError
from service.errors import SpoolError
from service.intake.group import GroupWriter
from service.intake.signals import Signal, parse_dict

__all__ = ["DEFAULT_MAX_BYTES", "Spool", "Spooled"]

log = structlog.get_logger("service.intake.spool")

DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
_RECORD_ROOM: Final = 64 * 1024  # more than a record takes (a body: --max-body-bytes, 16 KiB)
_MIN_FREE_AT_START: Final = 1024 * 1024
_CHUNK_BYTES: Final = 1024 * 1024  # replay reads at most this much, or _CHUNK_LINES, at once
_CHUNK_LINES: Final = 1000
_LOCK_WAIT: Final = 2.0  # seconds an append waits for another process's flock
_GROUP_MAX: Final = 1000  # signals in one write and fsync at most
_MAX_ALERTS: Final = 100
_FULL_ALERT_EVERY: Final = 60.0
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_OLD_FORMAT_SKEW: Final = timedelta(days=1)  # its clock was checked on arrival
_REPLAYING: Final = re.compile(r"(?P<name>.+)\.\d+\.replaying\.jsonl")


@dataclass(frozen=True, slots=True)
class Spooled:
    """One signal read back from the spool, ready for the inbox."""

    signal: Signal
    fingerprint: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class _Alert:
    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Chunk:
    lines: list[tuple[int, bytes]]  # (offset, line without its newline)
    end: int  # offset after the last byte consumed
    oversized: tuple[int, int] | None = None  # a line longer than a chunk: its byte range


class _BadRecord(ValueError):
    """A line that is JSON but not a spool record."""


class Spool:
    """The spool directory of one instance; appends go to `path`."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.directory = path.parent
        self.max_bytes = max_bytes
        # Group append: what arrives while a write is under way goes in the next one
        # (one write and one fsync for all of them), as the inbox groups its commits.
        self._group: GroupWriter[bytes, None] = GroupWriter(
            self._write_group, cap=_GROUP_MAX, name="spool-writer",
            stopped=lambda: SpoolError(f"spool {self.path}: the writer stopped", "spool_error"),
        )  # fmt: skip
        self._replay_lock = asyncio.Lock()
        self._write_mutex = threading.Lock()  # the fd: a cancelled request's thread goes on
        self._count_mutex = threading.Lock()  # the counters, held only briefly
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None  # (st_dev, st_ino) `_records` counts
        self._records = 0
        self._refused = 0
        self._quarantined = 0
        self._alerts: deque[_Alert] = deque()
        self._alerts_dropped = 0
        self._last_full_alert = -math.inf
        self._progress: dict[tuple[int, ...], int] = {}  # replaying file -> offset stored
        self._count_existing()
        _ignore_sigxfsz()

    # -- what the spool holds, cheaply ----------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters and sizes from stat: never reads a spool file."""
        size = _size(self.path)
        with self._count_mutex:
            if size == 0:  # emptied, possibly by another process's replay
                self._records = 0
            records = self._records
        sizes = [file_size for _, file_size in self._spool_files()]
        return {
            "bytes": size,
            "records": records,
            "max_bytes": self.max_bytes,
            "refused": self._refused,
            "quarantined": self._quarantined,
            "waiting_files": sum(1 for file_size in sizes if file_size),
            "waiting_bytes": sum(sizes),
            "alerts_queued": len(self._alerts),
            "alerts_dropped": self._alerts_dropped,
        }

    def waiting(self) -> bool:
        """Whether any spool file of the directory holds something to replay."""
        return any(size for _, size in self._spool_files())

    def can_accept(self) -> tuple[bool, str]:
        """Whether an append of a maximal record would succeed now, from stat,
        statvfs and getrlimit only: (False, why) when it would not."""
        size = _size(self.path)
        if size + _RECORD_ROOM > self.max_bytes:
            return False, f"spool file at {size} of at most {self.max_bytes} bytes"
        where = self.directory
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            vfs = os.statvfs(where)
        except OSError as exc:
            return False, f"{where}: {exc.strerror}"
        if vfs.f_flag & os.ST_RDONLY or not os.access(where, os.W_OK | os.X_OK):
            return False, f"{where} is not writable"
        if vfs.f_bavail * vfs.f_frsize < _RECORD_ROOM:
            return False, f"{where}: file system full ({vfs.f_bavail * vfs.f_frsize} bytes free)"
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and size + _RECORD_ROOM > limit:
            return False, f"file size limit of {limit} bytes reached"
        return True, "ok"

    def check_directory(self, min_free: int = _MIN_FREE_AT_START) -> None:
        """At start: the directory exists (created), takes an fsynced file, and its
        file system has `min_free` bytes free. Else ConfigError, one line."""
        where = self.directory
        probe = where / f".probe-{os.getpid()}"
        try:
            if not where.exists():
                # exist_ok: instances sharing a data dir start side by side
                where.mkdir(parents=True, exist_ok=True)
                _fsync_dir(where.parent)
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    _write_all(fd, b"probe\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)
            vfs = os.statvfs(where)
        except OSError as exc:
            raise ConfigError(
                f"spool directory {where} is not usable: {exc.strerror or exc}"
            ) from None
        free = vfs.f_bavail * vfs.f_frsize
        if free < min_free:
            raise ConfigError(
                f"spool directory {where}: only {free} bytes free on its file system,"
                f" at least {min_free} needed"
            )

    # -- appending ------------------------------------------------------------

    async def append(self, signal: Signal, fingerprint: str, received_at: datetime) -> None:
        """Append one signal, fsynced; SpoolError (and the file as it was) if not.
        Signals appended meanwhile share the write and its fsync."""
        record = {
            "v": 2,
            "signal": signal.payload(),
            "fingerprint": fingerprint,
            "received_at": received_at.isoformat(),
        }
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        try:
            await self._group.submit(line)  # a request that goes away leaves the write on
        except SpoolError as exc:
            self._refused += 1
            if exc.full and time.monotonic() - self._last_full_alert >= _FULL_ALERT_EVERY:
                self._last_full_alert = time.monotonic()
                self._alert(
                    "spool_full",
                    path=str(self.path),
                    reason=exc.reason,
                    error=str(exc),
                    bytes=_size(self.path),
                    max_bytes=self.max_bytes,
                    refused=self._refused,
                )
            raise

    async def _write_group(self, lines: list[bytes]) -> list[SpoolError | None]:
        """Append a group in one write and fsync. A group the cap refuses whole is tried
        line by line (those that fit go in); any other failure refuses the group whole,
        the file cut back to its size before."""
        try:
            await asyncio.to_thread(self._append, b"".join(lines), len(lines))
        except SpoolError as exc:
            if not (exc.full and len(lines) > 1):
                raise
            outcomes: list[SpoolError | None] = []
            for line in lines:
                try:
                    await asyncio.to_thread(self._append, line, 1)
                except SpoolError as one:
                    outcomes.append(one)
                else:
                    outcomes.append(None)
            return outcomes
        return [None] * len(lines)

    def _append(self, data: bytes, records: int) -> None:
        with self._write_mutex:
            try:
                fd = self._locked_fd()
            except OSError as exc:
                raise _error(self.path, exc) from exc
            try:
                _append_all(fd, data, self.path, limit=self.max_bytes)
                with self._count_mutex:
                    self._records += records
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _locked_fd(self) -> int:
        """The open own file, flock held, still the file at `path` (a replay may
        have renamed the one we had)."""
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            fd = self._fd if self._fd is not None else self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if _is_at(fd, self.path):
                    if time.monotonic() > deadline:
                        raise SpoolError(
                            f"spool {self.path}: locked by another process for {_LOCK_WAIT} s",
                            "spool_busy",
                        ) from None
                    time.sleep(0.005)
                else:
                    self._close()
                continue
            if _is_at(fd, self.path):
                return fd
            fcntl.flock(fd, fcntl.LOCK_UN)
            self._close()

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            new_dir = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags | os.O_CREAT, 0o600)
            # make the new directory entries durable too
            if new_dir:
                _fsync_dir(self.directory.parent)
            _fsync_dir(self.directory)
        st = os.fstat(fd)
        with self._count_mutex:
            known = self._file == (st.st_dev, st.st_ino)
        if not known:
            records = _count_lines(fd) if st.st_size else 0  # rare: a file counted by nobody
            with self._count_mutex:
                self._file, self._records = (st.st_dev, st.st_ino), records
        self._fd = fd
        return fd

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._write_mutex:
            self._close()

    def _count_existing(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            self._file, self._records = (st.st_dev, st.st_ino), _count_lines(fd)
        finally:
            os.close(fd)

    # -- replaying ------------------------------------------------------------

    async def replay(self, store: Callable[[Spooled], Awaitable[object]]) -> int:
        """Store every spooled signal, then remove its file. Raises (keeping the
        file) when `store` fails; returns how many signals were stored."""
        async with self._replay_lock:
            files = await asyncio.to_thread(self._replay_order)
            stored = 0
            for file in files:
                stored += await self._replay_file(file, store)
            return stored

    def _replay_order(self) -> list[Path]:
        # A replay cut short goes first: its signals are the oldest.
        files = []
        for path, size in self._spool_files():
            replaying = _REPLAYING.fullmatch(path.name) is not None
            if size or replaying:
                files.append((not replaying, path.name, path))
        return [path for _, _, path in sorted(files)]

    async def _replay_file(self, file: Path, store: Callable[[Spooled], Awaitable[object]]) -> int:
        if not _REPLAYING.fullmatch(file.name):
            # One signal first, the file left in place: while the database is away
            # this fails, nothing is renamed, and the cap keeps covering the file.
            first = await asyncio.to_thread(_first_record, file)
            if first is not None:
                await store(first)
        claimed = await asyncio.to_thread(self._claim, file)
        if claimed is None:
            return 0
        fd, work, key = claimed
        try:
            name = _instance_name(work)
            offset = self._progress.get(key, 0)
            stored = 0
            while (chunk := await asyncio.to_thread(_read_chunk, fd, offset)) is not None:
                stored += await self._replay_chunk(fd, name, work, chunk, store)
                offset = self._progress[key] = chunk.end
            await asyncio.to_thread(self._remove, work)
            self._progress.pop(key, None)
            return stored
        finally:
            os.close(fd)  # releases the flock

    def _claim(self, file: Path) -> tuple[int, Path, tuple[int, ...]] | None:
        """Open `file` with its flock held, renamed to a `.replaying` name unless it
        has one; None when it is gone, empty, or someone else holds it."""
        try:
            fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # its owner is appending, or another replayer has it
                return None
            st = os.fstat(fd)
            if not _is_at(fd, file) or (st.st_size == 0 and not _REPLAYING.fullmatch(file.name)):
                os.close(fd)
                return None
            work = file
            if not _REPLAYING.fullmatch(file.name):
                work = file.with_name(f"{file.stem}.{time.time_ns()}.replaying.jsonl")
                os.rename(file, work)
                _fsync_dir(self.directory)
                if file.name == self.path.name:
                    with self._count_mutex:
                        if self._file == (st.st_dev, st.st_ino):
                            self._file, self._records = None, 0
                st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        # The size and ctime tell a reused inode apart: its progress is not this file's.
        return fd, work, (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)

    async def _replay_chunk(
        self,
        fd: int,
        name: str,
        work: Path,
        chunk: _Chunk,
        store: Callable[[Spooled], Awaitable[object]],
    ) -> int:
        decoded: list[Spooled] = []
        bad: list[tuple[int, bytes, str]] = []
        for offset, raw in chunk.lines:
            if not raw.strip():
                continue
            try:
                decoded.append(_decode(json.loads(raw)))
            except (ValueError, RecursionError) as exc:
                bad.append((offset, raw, _first_line(exc)))
        # Concurrently: the inbox writes them in a few group commits, in this order.
        results = await asyncio.gather(*(store(item) for item in decoded), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if chunk.oversized is not None:
            start, end = chunk.oversized
            target = await asyncio.to_thread(self._quarantine_range, fd, name, start, end)
            self._quarantined += 1
            self._alert_quarantined(work, target, [start], f"a line of {end - start} bytes")
        if bad:
            lines = [raw for _, raw, _ in bad]
            target = await asyncio.to_thread(self._quarantine, name, lines)
            self._quarantined += len(bad)
            self._alert_quarantined(work, target, [offset for offset, _, _ in bad], bad[0][2])
        return len(decoded)

    def _quarantine_path(self, name: str) -> Path:
        directory = self.directory / "quarantine"
        if not directory.exists():
            directory.mkdir(exist_ok=True)
            _fsync_dir(self.directory)
        return directory / f"{name}.jsonl"

    def _quarantine(self, name: str, lines: list[bytes]) -> Path:
        target = self._quarantine_path(name)
        _append_file(target, b"".join(line + b"\n" for line in lines))
        return target

    def _quarantine_range(self, fd: int, name: str, start: int, end: int) -> Path:
        target = self._quarantine_path(name)
        pieces = []
        for at in range(start, end, _CHUNK_BYTES):  # rare: a damaged file
            pieces.append(os.pread(fd, min(_CHUNK_BYTES, end - at), at))
        _append_file(target, b"".join(pieces) + b"\n")
        return target

    def _remove(self, work: Path) -> None:
        os.unlink(work)
        _fsync_dir(self.directory)

    def _spool_files(self) -> list[tuple[Path, int]]:
        """(path, size) of every spool file in the directory: a listing and stats."""
        found = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".jsonl") and entry.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            found.append((self.directory / entry.name, entry.stat().st_size))
        except OSError:
            return []
        return found

    # -- alerts ---------------------------------------------------------------

    def _alert_quarantined(self, work: Path, target: Path, offsets: list[int], why: str) -> None:
        self._alert(
            "spool_quarantined",
            file=str(work),
            quarantine=str(target),
            lines=len(offsets),
            offsets=offsets[:10],
            error=why,
        )

    def _alert(self, kind: str, **detail: Any) -> None:
        detail["at"] = datetime.now(UTC).isoformat()
        log.critical("spool alert", kind=kind, **detail)
        if len(self._alerts) >= _MAX_ALERTS:
            self._alerts_dropped += 1
        else:
            self._alerts.append(_Alert(kind, detail))

    async def flush_alerts(self, send: Callable[[str, str], Awaitable[object]]) -> int:
        """Hand queued alerts to `send(kind, detail JSON)`, oldest first, each
        removed once sent; raises (keeping the rest) when `send` fails."""
        sent = 0
        while self._alerts:
            alert = self._alerts[0]
            await send(alert.kind, json.dumps(alert.detail))
            self._alerts.popleft()
            sent += 1
        if self._alerts_dropped:
            dropped = self._alerts_dropped
            await send("spool_alerts_dropped", json.dumps({"dropped": dropped}))
            self._alerts_dropped -= dropped
            sent += 1
        return sent


# -- records --------------------------------------------------------------------


def _decode(record: object) -> Spooled:
    """A record as written (v2: the signal's payload), or as written before v2
    (the body without its secret, validated again)."""
    try:
        if not isinstance(record, dict):
            raise _BadRecord("not a JSON object")
        received_at = datetime.fromisoformat(record["received_at"])
        if received_at.utcoffset() is None:
            raise _BadRecord("received_at has no time zone")
        fingerprint = record["fingerprint"]
        if not isinstance(fingerprint, str) or not fingerprint:
            raise _BadRecord("fingerprint is not a string")
        if record.get("v") == 2:
            signal = Signal.from_payload(record["signal"])
        elif "v" not in record and "body" in record:
            parsed = parse_dict(record["body"], now=received_at, max_future_skew=_OLD_FORMAT_SKEW)
            signal = parsed.signal
        else:
            raise _BadRecord(f"unknown record version {record.get('v')!r}")
    except _BadRecord:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise _BadRecord(f"not a spool record: {type(exc).__name__}: {exc}") from None
    return Spooled(signal, fingerprint, received_at)


# -- files ----------------------------------------------------------------------


def _append_all(fd: int, data: bytes, path: Path, *, limit: int | None = None) -> None:
    """Append all of `data` and fsync, or leave the file as it was and raise
    SpoolError. Called with the file's flock held. A file not ending in a newline
    (a crash mid-append) first gets one: its torn tail becomes a line of its own."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data
    if limit is not None and size + len(data) > limit:
        raise SpoolError(
            f"spool {path} is full: {size} bytes, at most {limit} (--spool-max-bytes)",
            "spool_full",
        )
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError as exc:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as undo:
            log.critical(
                "spool: a failed append could not be undone; its torn line will be quarantined",
                path=str(path),
                error=undo.strerror,
            )
        raise _error(path, exc) from exc


def _append_file(path: Path, data: bytes) -> None:
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _append_all(fd, data, path)
    finally:
        os.close(fd)
    if new:
        _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)  # may write fewer bytes than asked: go on
        view = view[written:]


def _error(path: Path, exc: OSError) -> SpoolError:
    reason = "disk_full" if exc.errno in _FULL_ERRNOS else "spool_error"
    return SpoolError(f"cannot write the spool {path}: {exc.strerror or exc}", reason)


def _read_chunk(fd: int, offset: int) -> _Chunk | None:
    """The next whole lines from `offset`: at most _CHUNK_LINES or _CHUNK_BYTES."""
    data = os.pread(fd, _CHUNK_BYTES, offset)
    if not data:
        return None
    cut = data.rfind(b"\n")
    if cut < 0:
        if len(data) < _CHUNK_BYTES:  # the last line, without its newline: torn
            return _Chunk([(offset, data)], offset + len(data))
        end = _line_end(fd, offset + len(data))
        return _Chunk([], min(end + 1, os.fstat(fd).st_size), oversized=(offset, end))
    lines = []
    at = offset
    for raw in data[:cut].split(b"\n")[:_CHUNK_LINES]:
        lines.append((at, raw))
        at += len(raw) + 1
    return _Chunk(lines, at)


def _first_record(path: Path) -> Spooled | None:
    """The first record of a file that decodes, if any (read without its flock:
    the line an append is writing does not decode, and is skipped)."""
    try:
        with path.open("rb") as f:
            data = f.read(_CHUNK_BYTES)
    except FileNotFoundError:
        return None
    for raw in data.split(b"\n")[:_CHUNK_LINES]:
        with contextlib.suppress(ValueError, RecursionError):
            return _decode(json.loads(raw))
    return None


def _line_end(fd: int, offset: int) -> int:
    """Offset of the newline ending the line that goes on at `offset` (or of EOF)."""
    while data := os.pread(fd, _CHUNK_BYTES, offset):
        found = data.find(b"\n")
        if found >= 0:
            return offset + found
        offset += len(data)
    return offset


def _count_lines(fd: int) -> int:
    count, offset, last = 0, 0, b"\n"
    while data := os.pread(fd, _CHUNK_BYTES, offset):
        count += data.count(b"\n")
        offset += len(data)
        last = data[-1:]
    return count + (last != b"\n")


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open `fd` still is the file at `path`."""
    st = os.fstat(fd)
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (at.st_dev, at.st_ino)


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _instance_name(path: Path) -> str:
    match = _REPLAYING.fullmatch(path.name)
    return match["name"] if match else path.name.removesuffix(".jsonl")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ignore_sigxfsz() -> None:
    # A write past a file-size limit (RLIMIT_FSIZE) must fail with EFBIG, which
    # refuses one signal with a 503, not kill the whole process (SIGXFSZ's default).
    # Children are unaffected: subprocess restores SIGXFSZ in them.
    with contextlib.suppress(ValueError):  # not the main thread: the caller's choice
        if signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
