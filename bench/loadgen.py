"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever
the earlier ones are doing, and latency is counted from the *scheduled* send time.

A closed loop (send, wait, send) slows down with the server and hides its worst
moments (coordinated omission); here a request the client could not send on
time because everything was busy still owes the delay to the server.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.stats import percentile, summary

__all__ = ["Step", "open_loop", "session"]

_HEADERS = {"Content-Type": "application/json"}


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


def session(connections: int) -> aiohttp.ClientSession:
    """One client session; keep-alive connections so the client spends its (shared)
    CPU on requests rather than TCP handshakes."""
    connector = aiohttp.TCPConnector(limit=connections, limit_per_host=connections)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def open_loop(
    http: aiohttp.ClientSession,
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
    loop = asyncio.get_running_loop()
    step = Step(rate, duration)
    total = int(rate * duration)
    start = loop.time() + 0.05
    pending: set[asyncio.Task[None]] = set()

    async def one(i: int, at: float) -> None:
        try:
            async with asyncio.timeout_at(at + timeout):
                url = urls[i % len(urls)]
                async with http.post(url, data=body(i), headers=_HEADERS) as resp:
                    raw = await resp.read()
            done = loop.time()
            step.span = max(step.span, done - start)
        except TimeoutError:
            step.timeouts += 1
            return
        except (aiohttp.ClientError, OSError) as exc:
            step.errors[type(exc).__name__] += 1
            return
        # The answer's status word without parsing the JSON: {"status": "accepted", ...}
        word = raw.split(b'"status": "', 1)[-1].split(b'"', 1)[0].decode(errors="replace")
        step.answers[f"{resp.status} {word[:20]}"] += 1
        if 200 <= resp.status < 300:
            step.latencies_ms.append((done - at) * 1000)

    for i in range(total):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        step.send_lag_ms.append(max(0.0, loop.time() - at) * 1000)
        task = asyncio.create_task(one(i, at))
        pending.add(task)
        task.add_done_callback(pending.discard)
        step.sent += 1
        elapsed = loop.time() - start
        if abort_ratio and elapsed > timeout and i % 100 == 0:
            failed = step.timeouts + sum(step.errors.values())
            if failed > abort_ratio * step.sent:
                step.aborted_at = round(elapsed, 2)
                break
    if pending:
        await asyncio.wait(pending)
    return step
