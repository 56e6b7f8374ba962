"""Slow clients against one gateway: what unauthenticated connections can hold.

CONNECTIONS (400) clients each open a connection to the public listener, send a
request head of HEADERS (30) header lines of HEADER_BYTES (4000) bytes, never
finish it, and go idle. Measured: the gateway's RSS before, at its peak and at
the end; how many of those connections the gateway had closed after HOLD (20 s);
whether a real webhook was still answered during the attack, and how fast.

    python -m bench.slow_clients   # ~25 s; JSON on stdout and in results/slow_clients.json

Run it against an older checkout to compare (the header limits of aiohttp's
defaults allow 120 header lines of 8 KiB: HEADERS=120 HEADER_BYTES=8000).
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from bench.harness import (
    Cluster,
    env_float,
    env_int,
    run_main,
    timings_from_env,
    webhook_body,
)
from bench.procstat import rss_mb


async def _slow_client(port: int, head: bytes, closed: list[float], started: float) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        closed.append(0.0)
        return
    try:
        writer.write(head)
        await writer.drain()
        await reader.read()  # returns b"" once the server closes (or answers and closes)
        closed.append(time.monotonic() - started)
    except OSError:
        closed.append(time.monotonic() - started)
    finally:
        writer.close()


async def _webhook(port: int) -> tuple[int, float]:
    body = webhook_body(f"slow_{time.monotonic_ns()}")
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    status = int((await reader.readline()).split()[1])
    await reader.read()
    writer.close()
    return status, (time.perf_counter() - started) * 1000


async def measure() -> dict[str, Any]:
    connections = env_int("CONNECTIONS", 400)
    headers = env_int("HEADERS", 30)
    size = env_int("HEADER_BYTES", 4000)
    hold = env_float("HOLD", 20.0)
    head = b"POST /webhook HTTP/1.1\r\nHost: g\r\n" + b"".join(
        f"X-Pad-{i}: ".encode() + b"a" * size + b"\r\n" for i in range(headers)
    )
    async with Cluster(1, timings_from_env()) as cluster:
        inst = cluster.instances[0]
        await cluster.steady()
        rss_before = rss_mb(inst.pid)
        closed: list[float] = []
        started = time.monotonic()
        clients = [
            asyncio.create_task(_slow_client(inst.port, head, closed, started))
            for _ in range(connections)
        ]
        peak = rss_before or 0.0
        during: tuple[int, float] | None = None
        while time.monotonic() - started < hold:
            await asyncio.sleep(0.25)
            peak = max(peak, rss_mb(inst.pid) or 0.0)
            if during is None and time.monotonic() - started > 1.0:
                try:
                    during = await asyncio.wait_for(_webhook(inst.port), 3.0)
                except (OSError, TimeoutError, ValueError, IndexError):
                    during = (0, 3000.0)
        closed_in_time = len(closed)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        return {
            "connections": connections,
            "headers": headers,
            "header_bytes": size,
            "hold_s": hold,
            "rss_mb_before": round(rss_before or 0.0, 1),
            "rss_mb_peak": round(peak, 1),
            "closed_by_server_within_hold": closed_in_time,
            "closed_after_s_max": round(max(closed), 2) if closed else None,
            "webhook_during_attack": {"status": during[0], "ms": round(during[1], 1)}
            if during
            else None,
        }


def main() -> int:
    return run_main(measure, "slow_clients")


if __name__ == "__main__":
    sys.exit(main())
