"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever
the earlier ones are doing, and latency is counted from the *scheduled* send time.

A closed loop (send, wait, send) slows down with the server and hides its worst
moments (coordinated omission); here a request the client could not send on
time because everything was busy still owes the delay to the server.

The client is a lean HTTP/1.1 one (`Client`) on asyncio streams: keep-alive
connections, one request at a time on each, just enough HTTP for what our
servers answer (a status line, headers, a Content-Length body). It shares the
machine with what it measures, and costs about half of aiohttp's client per
request (304-322 against 464-675 us of CPU at 500-1000/s on the development
machine, 2026-12-01): CPU the servers get instead. A real deployment's load
comes from elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from bench.stats import percentile, summary

__all__ = ["Client", "HTTPError", "Step", "open_loop", "session"]


class HTTPError(Exception):
    """An answer this client cannot read (not HTTP/1.x, no Content-Length)."""


@dataclass(slots=True)
class Step:
    rate: float
    duration: float
    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "202 accepted", "200 executed", ...
    errors: Counter[str] = field(default_factory=Counter)  # connection errors by type
    timeouts: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # of 2xx answers
    send_lag_ms: list[float] = field(default_factory=list)  # how late the client sent each
    span: float = 0.0  # first scheduled send -> last answer
    aborted_at: float | None = None

    @property
    def ok(self) -> int:
        return sum(n for k, n in self.answers.items() if k.startswith("2"))

    def report(self) -> dict[str, Any]:
        bad_answers = sum(n for k, n in self.answers.items() if not k.startswith("2"))
        lag = sorted(self.send_lag_ms)
        return {
            "rate": self.rate,
            "duration_s": self.duration,
            "sent": self.sent,
            "answered_2xx": self.ok,
            "answers": dict(self.answers),
            "errors": sum(self.errors.values()) + bad_answers,
            "error_kinds": dict(self.errors),
            "timeouts": self.timeouts,
            "achieved_rate": round(self.ok / max(self.span, self.duration), 1),
            "latency_ms": summary(self.latencies_ms),
            "client_send_lag_ms": {
                "p99": round(percentile(lag, 99), 2) if lag else None,
                "max": round(lag[-1], 2) if lag else None,
            },
            "aborted_at_s": self.aborted_at,
        }


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    """HTTP/1.1 over keep-alive connections: at most `connections` open at once
    (a request waits for one, and that wait counts in its latency); a connection
    is reused only after a complete answer, and closed on any error or timeout."""

    def __init__(self, connections: int) -> None:
        self._slots = asyncio.Semaphore(connections)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._targets: dict[str, tuple[str, int, bytes]] = {}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for _, writer in conns:
                writer.close()
        self._idle.clear()

    async def request(self, method: str, url: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one request."""
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            head = (
                f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Type: application/json\r\n"
            )
            target = self._targets[url] = (host, port, head.encode())
        host, port, head = target
        request = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        async with self._slots:
            idle = self._idle.setdefault((host, port), [])
            reused = self._reusable(idle)
            reader, writer = reused or await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                status, answer, keep = await _answer(reader)
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                writer.close()
                partial = getattr(exc, "partial", b"")
                if reused is None or partial:
                    raise
                # The server closed this idle connection as the request went out (its
                # keep-alive deadline): nothing was read, so send again on a new one,
                # as HTTP clients and HAProxy (retry-on empty-response) do.
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(request)
                    status, answer, keep = await _answer(reader)
                except BaseException:
                    writer.close()
                    raise
            except BaseException:
                writer.close()
                raise
            if keep:
                idle.append((reader, writer))
            else:
                writer.close()
            return status, answer

    @staticmethod
    def _reusable(idle: list[_Conn]) -> _Conn | None:
        """The most recent idle connection the server has not closed meanwhile."""
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise HTTPError(f"not an HTTP/1.x answer: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at < 0:
        raise HTTPError("answer without Content-Length")
    length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    body = await reader.readexactly(length)
    return status, body, b"\r\nconnection: close" not in lower


def session(connections: int) -> Client:
    """One client for a whole run: its keep-alive connections carry over from step
    to step, so the client spends its (shared) CPU on requests, not handshakes."""
    return Client(connections)


async def open_loop(
    http: Client,
    urls: Sequence[str],
    rate: float,
    duration: float,
    body: Callable[[int], bytes],
    *,
    timeout: float = 3.0,
    abort_ratio: float = 0.05,
) -> Step:
    """Send `rate` requests/s for `duration` s, round-robin over `urls`.

    A request unanswered `timeout` s after its scheduled time is a timeout
    (TradingView gives up after 3 s). The step stops early once more than
    `abort_ratio` of the requests sent failed: the rate is lost anyway, and a
    long overload only lengthens the backlog the next step would inherit.
    """
    # time.perf_counter, not the loop's clock: uvloop's moves in whole milliseconds,
    # which rounded every latency to a millisecond (a bare server's p50 read 0 ms).
    clock = time.perf_counter
    step = Step(rate, duration)
    total = int(rate * duration)
    start = clock() + 0.05
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, at: float) -> None:
        try:
            async with asyncio.timeout(at + timeout - clock()):
                status, raw = await http.request("POST", urls[i % len(urls)], body(i))
            done = clock()
            step.span = max(step.span, done - start)
        except TimeoutError:
            step.timeouts += 1
            return
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HTTPError) as exc:
            step.errors[type(exc).__name__] += 1
            return
        # The answer's status word without parsing the JSON: {"status": "accepted", ...}
        word = raw.split(b'"status": "', 1)[-1].split(b'"', 1)[0].decode(errors="replace")
        step.answers[f"{status} {word[:20]}"] += 1
        if 200 <= status < 300:
            step.latencies_ms.append((done - at) * 1000)

    for i in range(total):
        at = start + i / rate
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        step.send_lag_ms.append(max(0.0, clock() - at) * 1000)
        task = asyncio.create_task(one(i, at))
        pending.add(task)
        task.add_done_callback(pending.discard)
        step.sent += 1
        elapsed = clock() - start
        if abort_ratio and elapsed > timeout and i % 100 == 0:
            failed = step.timeouts + sum(step.errors.values())
            if failed > abort_ratio * step.sent:
                step.aborted_at = round(elapsed, 2)
                break
    if pending:
        await asyncio.wait(pending)
    return step
