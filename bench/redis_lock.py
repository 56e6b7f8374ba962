"""The baseline: a Redis TTL-lock coordinator, written for the benchmark only.

The design this project replaces, and the shape of most lease-based electors:

- a candidate tries `SET key id NX PX lease` every `retry` seconds;
- the holder renews every `renew` seconds with a compare-and-set script (only
  while the key still holds its own id);
- nobody notices a dead holder: the others wait until the key expires.

`python -m bench.redis_lock candidate --key K --id ID --lease 30 --renew 5 --retry 1`
runs one candidate (a separate process, so SIGKILL is real). It prints a JSON line
per change of role, stamped with its CLOCK_MONOTONIC time, which is system-wide on
Linux, so the benchmark compares it with its own kill time without pipe delays.

`measure()` runs three candidates and kills the holder `rounds` times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.harness import uninterrupted
from pgleader.demo import Timeline

__all__ = ["CONFIGS", "LockConfig", "available", "measure"]

# Renew only our own lock: a plain PEXPIRE would extend a successor's (river #197).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class LockConfig:
    name: str
    lease: float
    renew: float
    retry: float
    what: str


CONFIGS = [
    LockConfig("redis_30s", 30.0, 5.0, 1.0, "the design this project replaces: 30 s TTL, renew 5 s"),
    LockConfig("redis_k8s_15s", 15.0, 10.0, 2.0, "Kubernetes-style lease 15 s, renew 10 s, retry 2 s"),
]  # fmt: skip


def _say(event: str, candidate: str) -> None:
    line = {"event": event, "id": candidate, "mono": time.monotonic()}
    print(json.dumps(line), flush=True)


def candidate(url: str, key: str, me: str, lease: float, renew: float, retry: float) -> None:
    import redis

    r = redis.Redis.from_url(url, socket_timeout=2)
    renew_script = r.register_script(_RENEW)
    lease_ms = int(lease * 1000)
    _say("started", me)
    while True:
        if r.set(key, me, nx=True, px=lease_ms):
            _say("acquired", me)
            while True:
                time.sleep(renew)
                if not renew_script(keys=[key], args=[me, lease_ms]):
                    _say("lost", me)
                    break
        else:
            time.sleep(retry)


def available(url: str) -> str | None:
    """None when a Redis answers at `url`, else why not."""
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class _Candidate:
    def __init__(self, url: str, key: str, me: str, config: LockConfig) -> None:
        self.me = me
        self.args = [
            sys.executable, "-m", "bench.redis_lock", "candidate", "--url", url, "--key", key,
            "--id", me, "--lease", str(config.lease), "--renew", str(config.renew),
            "--retry", str(config.retry),
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self, lines: Timeline) -> None:
        spawn = asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        self.proc = await uninterrupted(spawn)
        self._reader = asyncio.create_task(self._read(lines))

    async def _read(self, lines: Timeline) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                lines.add(json.loads(raw))

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def measure(url: str, config: LockConfig, rounds: int) -> list[float]:
    """Seconds from SIGKILL of the holder until another candidate holds the lock."""
    import redis

    key = f"pgleader-bench:{config.name}:{uuid.uuid4().hex[:8]}"
    lines = Timeline()
    candidates = {f"c{n}": _Candidate(url, key, f"c{n}", config) for n in (1, 2, 3)}
    samples: list[float] = []
    try:
        for c in candidates.values():
            await c.start(lines)
        seen, _, line = await lines.wait(timeout=config.lease + 10, event="acquired")
        holder = line["id"]
        for _ in range(rounds):
            # A random phase against the holder's renewals: the failover time
            # depends on how long ago the last renewal was.
            await asyncio.sleep(random.uniform(0, config.renew))
            killed_at = time.monotonic()
            assert candidates[holder].proc is not None
            candidates[holder].proc.send_signal(signal.SIGKILL)
            wait = config.lease + config.retry + 10
            seen, _, line = await lines.wait(timeout=wait, since=seen + 1, event="acquired")
            samples.append(line["mono"] - killed_at)
            await candidates[holder].stop()
            mark = len(lines.lines)
            await candidates[holder].start(lines)
            await lines.wait(timeout=10, since=mark, event="started", id=holder)
            holder = line["id"]
        return samples
    finally:

        async def cleanup() -> None:
            for c in candidates.values():
                await c.stop()
            with contextlib.suppress(Exception):
                redis.Redis.from_url(url, socket_timeout=1).delete(key)

        await uninterrupted(cleanup())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    c = verbs.add_parser("candidate", help="run one lock candidate until killed")
    c.add_argument("--url", default="redis://127.0.0.1:6379/0")
    c.add_argument("--key", required=True)
    c.add_argument("--id", required=True)
    c.add_argument("--lease", type=float, required=True)
    c.add_argument("--renew", type=float, required=True)
    c.add_argument("--retry", type=float, required=True)
    args: Any = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        candidate(args.url, args.key, args.id, args.lease, args.renew, args.retry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
