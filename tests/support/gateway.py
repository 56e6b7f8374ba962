"""Real `pgleader serve` processes for tests, and the signals they are sent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from pgleader.embedded import free_port
from service.web.routes import PUBLIC_PATHS

SECRET = "test-secret-5d1f"
ADMIN_TOKEN = "admin-token-9c2e"
FAST = ["--heartbeat", "0.2", "--lease", "0.6", "--evict-after", "1.2", "--sweep-interval", "0.2"]
_numbers = itertools.count(1)


def signal_body(
    *,
    type: str = "BASE_ENTRY",
    instrument: str = "BANK_NIFTY",
    position: str | None = None,
    lots: Any = 5,
    at: datetime | None = None,
    secret: str | None = SECRET,
    **extra: Any,
) -> dict[str, Any]:
    """A canonical webhook body; every call is a distinct signal unless told otherwise."""
    body: dict[str, Any] = {
        "type": type,
        "instrument": instrument,
        "position": position or f"Long_{next(_numbers)}",
        "lots": lots,
        "price": 52000.5,
        "stop": 51500,
        "timestamp": (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if secret is not None:
        body["secret"] = secret
    body.update(extra)
    return body


def sign(raw: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


class GatewayProcess:
    """One `pgleader serve` child; logs to a file the test may read."""

    def __init__(
        self, dsn: str, instance_id: str, data_dir: Path, *args: str, log_dir: Path | None = None
    ) -> None:
        self.dsn = dsn
        self.instance_id = instance_id
        self.data_dir = data_dir
        self.port = free_port()
        self.operator_port = free_port()
        self.args = list(args)
        # A test may put data_dir on a small file system it fills: the log goes elsewhere.
        self.log_path = (log_dir or data_dir) / f"{instance_id}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The public listener: the webhook, /health, /ready."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def operator_url(self) -> str:
        """The operator's listener: signals, coordinator, admin, metrics."""
        return f"http://127.0.0.1:{self.operator_port}"

    async def start(self, timeout: float = 30) -> None:
        env = {**os.environ, "PGLEADER_WEBHOOK_SECRET": SECRET, "PGLEADER_ADMIN_TOKEN": ADMIN_TOKEN}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgleader", "serve", "--dsn", self.dsn,
                "--port", str(self.port), "--operator-port", str(self.operator_port),
                "--instance-id", self.instance_id,
                "--data-dir", str(self.data_dir), "--log-format", "json", *FAST, *self.args,
                stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
            )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.instance_id} exited at start: {self.log_tail()}")
        assert json.loads(line)["event"] == "serving", line

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def wait(self, timeout: float = 40) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            await self.wait(15)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return ""


class Cluster:
    """Gateway processes on one database, an HTTP session, and the database itself."""

    def __init__(self, dsn: str, data_dir: Path, session: aiohttp.ClientSession) -> None:
        self.dsn = dsn
        self.data_dir = data_dir
        self.http = session
        self.nodes: dict[str, GatewayProcess] = {}

    async def start(self, n: int, *args: str) -> list[GatewayProcess]:
        new = [
            GatewayProcess(self.dsn, f"gw{len(self.nodes) + i + 1}", self.data_dir, *args)
            for i in range(n)
        ]
        for node in new:
            self.nodes[node.instance_id] = node
        await asyncio.gather(*(node.start() for node in new))
        return new

    async def post(
        self, node: GatewayProcess, body: Any, **kwargs: Any
    ) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, (bytes, str)):
            kwargs.setdefault("json", body)
        else:
            kwargs.setdefault("data", body)
        async with self.http.post(f"{node.url}/webhook", **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, node: GatewayProcess, path: str) -> tuple[int, dict[str, Any]]:
        """GET a path from the listener that serves it (public or operator)."""
        base = node.url if path in PUBLIC_PATHS else node.operator_url
        async with self.http.get(f"{base}{path}") as resp:
            return resp.status, await resp.json(content_type=None)

    async def leader(self, timeout: float = 15) -> GatewayProcess:
        """The node that leads, by the database view (polled: leadership has no HTTP event)."""
        async with asyncio.timeout(timeout):
            while True:
                name = await self.scalar(
                    "select leader from pgleader.leader where election = 'gateway'"
                )
                if name in self.nodes and self.nodes[name].proc.returncode is None:
                    return self.nodes[name]
                await asyncio.sleep(0.05)

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(sql, params or None)
            return await cur.fetchall() if cur.description else []

    async def scalar(self, sql: str, *params: Any) -> Any:
        rows = await self.query(sql, *params)
        return rows[0][0] if rows else None

    async def settled(self, signal_ids: list[int], timeout: float = 30) -> dict[int, str]:
        """Wait until none of the signals is pending/executing; returns their statuses."""
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.query(
                    "select id, status from gateway.signals where id = any(%s)", signal_ids
                )
                statuses = dict(rows)
                if len(statuses) == len(set(signal_ids)) and not {"pending", "executing"} & set(
                    statuses.values()
                ):
                    return statuses
                await asyncio.sleep(0.05)

    async def broker_requests_per_signal(self) -> dict[int, int]:
        rows = await self.query(
            "select o.signal_id, count(p.id) from gateway.orders o"
            " join gateway.paper_broker_requests p on p.client_order_id = o.client_order_id"
            " group by o.signal_id"
        )
        return dict(rows)

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes.values()))


@contextlib.asynccontextmanager
async def cluster(dsn: str, data_dir: Path) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        c = Cluster(dsn, data_dir, session)
        try:
            yield c
        finally:
            await c.stop()


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Bounded polling, for outcomes that only show in the database or over HTTP."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)
