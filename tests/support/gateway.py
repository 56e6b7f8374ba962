"""Real `pgleader serve` processes for tests, and the signals they are sent; a
gateway trading at the fake OpenAlgo (`Trading`)."""

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from pgleader.embedded import free_port
from service.web.routes import PUBLIC_PATHS
from tests.support.openalgo import FakeOpenAlgo

SECRET = "test-secret-5d1f"
ADMIN_TOKEN = "admin-token-9c2e"
OPENALGO_KEY = "oa-gateway-key-41d7e0"
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
        self,
        dsn: str,
        instance_id: str,
        data_dir: Path,
        *args: str,
        log_dir: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.instance_id = instance_id
        self.data_dir = data_dir
        self.port = free_port()
        self.operator_port = free_port()
        self.args = list(args)
        self.env = dict(env or {})  # PGLEADER_* settings of this instance, over the defaults
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
        env = {
            **os.environ,
            "PGLEADER_WEBHOOK_SECRET": SECRET,
            "PGLEADER_ADMIN_TOKEN": ADMIN_TOKEN,
            **self.env,
        }
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

    async def start(
        self, n: int, *args: str, env: Mapping[str, str] | None = None
    ) -> list[GatewayProcess]:
        new = [
            GatewayProcess(self.dsn, f"gw{len(self.nodes) + i + 1}", self.data_dir, *args, env=env)
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

    async def admin(
        self, node: GatewayProcess, path: str, body: Any = None, *, token: str | None = ADMIN_TOKEN
    ) -> tuple[int, dict[str, Any]]:
        """POST an operator's request (/admin/..., /coordinator/resign) with a bearer token
        (None: without one); a dict body goes as JSON, str or bytes as they are."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if isinstance(body, (bytes, str)):
            kwargs["data"] = body
        elif body is not None:
            kwargs["json"] = body
        async with self.http.post(f"{node.operator_url}{path}", **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)

    async def alerts(self, kind: str) -> list[str]:
        """The details of the alerts of one kind, oldest first."""
        rows = await self.query(
            "select detail from gateway.alerts where kind = %s order by id", kind
        )
        return [str(r[0]) for r in rows]

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


async def eventually(check: Callable[[], bool], timeout: float = 30) -> None:
    """`until` for a condition read without I/O (an in-process fake's state)."""
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.05)


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


def instruments_file(path: Path, instruments: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write an instruments file (service.instruments): {name: {exchange, symbol, ...}}."""
    lines = []
    for name, table in instruments.items():
        lines.append(f"[instruments.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def openalgo_env(url: str, api_key: str, instruments: Path, **settings: Any) -> dict[str, str]:
    """The environment of a gateway trading at an OpenAlgo server; `settings` are
    further PGLEADER_* variables by their lower-case suffix (broker_timeout=0.5)."""
    env = {
        "PGLEADER_BROKER": "openalgo",
        "PGLEADER_OPENALGO_URL": url,
        "PGLEADER_OPENALGO_API_KEY": api_key,
        "PGLEADER_INSTRUMENTS_FILE": str(instruments),
        "PGLEADER_OPENALGO_MODE": "live",
    }
    env.update({f"PGLEADER_{name.upper()}": str(value) for name, value in settings.items()})
    return env


async def pgleader_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run `python -m pgleader ARGS` without blocking the event loop (an in-process
    fake broker must keep answering meanwhile); (exit code, stdout, stderr), stdout
    a pipe, as from a script."""
    base = {k: v for k, v in os.environ.items() if k not in ("PGLEADER_DSN", "DATABASE_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgleader", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ---------------------------------------------------------------- trading at OpenAlgo


@dataclass(frozen=True)
class Traded:
    """One table of the instruments file: where a webhook instrument trades."""

    exchange: str
    symbol: str
    product: str = "NRML"
    lot_size: int = 75
    max_lots: int = 10

    def table(self) -> dict[str, Any]:
        return {
            "exchange": self.exchange, "symbol": self.symbol, "product": self.product,
            "lot_size": self.lot_size, "max_lots": self.max_lots,
        }  # fmt: skip


def futures(*names: str) -> dict[str, Traded]:
    """An NFO futures contract of its own per instrument name (NIFTY_A: NIFTYA29DEC26FUT)."""
    return {name: Traded("NFO", f"{name.replace('_', '')}29DEC26FUT") for name in names}


_last_signal_time = datetime.min.replace(tzinfo=UTC)


def distinct_time() -> datetime:
    """A signal time to the second (as fingerprints read it), later than the one the
    call before gave and at most a minute old: a test's signals never collapse into
    one, and execute in the order posted."""
    global _last_signal_time
    now = datetime.now(UTC).replace(microsecond=0)
    _last_signal_time = min(
        now, max(now - timedelta(seconds=60), _last_signal_time + timedelta(seconds=1))
    )
    return _last_signal_time


@dataclass
class Trading:
    """Gateways trading at the fake OpenAlgo: the cluster, the node that led when it
    started, the settings they run with (`env`), the broker and what it trades."""

    gw: Cluster
    node: GatewayProcess
    fake: FakeOpenAlgo
    traded: dict[str, Traded]
    env: dict[str, str]

    def held(self, name: str) -> int:
        """The fake broker's net position of an instrument."""
        t = self.traded[name]
        return self.fake.position(t.symbol, t.exchange, t.product)

    def orders(self, name: str) -> list[tuple[str, int]]:
        """What the fake placed for an instrument: (action, quantity), in order."""
        symbol = self.traded[name].symbol
        return [(o.action, o.quantity) for o in self.fake.orders if o.symbol == symbol]

    async def post(
        self, node: GatewayProcess | None = None, **fields: Any
    ) -> tuple[int, dict[str, Any]]:
        """A webhook (signal_body's fields, a distinct time unless `at` is given) to
        `node`, by default the one that led at the start."""
        fields.setdefault("at", distinct_time())
        return await self.gw.post(node or self.node, signal_body(**fields))

    async def status(self, signal_id: int) -> str:
        query = "select status from gateway.signals where id = %s"
        return str(await self.gw.scalar(query, signal_id))

    async def reaches(self, signal_id: int, wanted: str, timeout: float = 20) -> None:
        """Wait until the signal's status is `wanted`."""

        async def there() -> bool:
            return await self.status(signal_id) == wanted

        await until(there, timeout)

    async def order_rows(self, signal_id: int) -> list[tuple[Any, ...]]:
        """(outcome, start_position, target_position, symbol, detail) of a signal's
        orders, oldest first."""
        return await self.gw.query(
            "select outcome, start_position, target_position, symbol, detail"
            " from gateway.orders where signal_id = %s order by id",
            signal_id,
        )

    async def halt_mode(self) -> str:
        return str(await self.gw.scalar("select mode from gateway.trading_halt"))


async def first_reconciliation(gw: Cluster) -> None:
    """Wait for the leader's first reconciliation (it asks the broker for positions
    when elected), so that a fault set next at the fake meets the test's own call."""
    query = "select count(*) > 0 from gateway.reconciliations where outcome is not null"
    await until(query_true(gw, query))


def query_true(gw: Cluster, query: str, *params: Any) -> Callable[[], Awaitable[bool]]:
    """A check for `until`: the query's first value is true."""

    async def check() -> bool:
        return bool(await gw.scalar(query, *params))

    return check


async def start_trading(
    gw: Cluster,
    fake: FakeOpenAlgo,
    traded: Mapping[str, Traded],
    *,
    nodes: int = 1,
    **settings: Any,
) -> Trading:
    """Start `nodes` gateways of `gw` trading `traded` at `fake` (live mode unless
    openalgo_mode says otherwise; `settings` are PGLEADER_* variables by suffix),
    once the leader has made its first reconciliation."""
    path = instruments_file(
        gw.data_dir / f"instruments-{len(gw.nodes)}.toml",
        {name: t.table() for name, t in traded.items()},
    )
    env = openalgo_env(fake.url, OPENALGO_KEY, path, **settings)
    await gw.start(nodes, env=env)
    leader = await gw.leader()
    await first_reconciliation(gw)
    return Trading(gw, leader, fake, dict(traded), env)


@contextlib.asynccontextmanager
async def trading_at(
    dsn: str,
    data_dir: Path,
    traded: Mapping[str, Traded],
    *,
    fake: FakeOpenAlgo | None = None,
    nodes: int = 1,
    **settings: Any,
) -> AsyncIterator[Trading]:
    """A fake OpenAlgo (answering at once unless one is given) and gateways trading
    at it on database `dsn`; all stopped at the end."""
    fake = fake or FakeOpenAlgo(OPENALGO_KEY, smart_order_delay=0.0)
    await fake.start()
    try:
        async with cluster(dsn, data_dir) as gw:
            yield await start_trading(gw, fake, traded, nodes=nodes, **settings)
    finally:
        await fake.close()
