"""What both benchmarks stand on: an embedded PostgreSQL in its own temp dir, real
`pgleader serve` processes on it, and an independent LISTEN client on pgleader_events.

Everything started here is stopped in `Cluster.__aexit__`, also on Ctrl-C, and
the temp dir is removed (set BENCH_KEEP=1 to keep it and the instances' logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from bench.proxy import Proxy
from pgleader.cli import run
from pgleader.config import Timings
from pgleader.demo import Timeline
from pgleader.embedded import EmbeddedPostgres, free_port
from pgleader.events import EVENTS_CHANNEL
from pgleader.migrations import migrate

__all__ = [
    "RESULTS",
    "SECRET",
    "Cluster",
    "Instance",
    "env_float",
    "env_int",
    "progress",
    "run_main",
    "settings_from_env",
    "timings_from_env",
    "uninterrupted",
    "until",
    "webhook_body",
]

SECRET = "bench-secret-7f3a"
T = TypeVar("T")
# BENCH_RESULTS: write elsewhere (a trial run must not overwrite the committed results).
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    return int(raw) if raw.strip() else default


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


def settings_from_env() -> dict[str, str]:
    """PostgreSQL settings for the benchmark's server from PG_SETTINGS, e.g.
    'synchronous_commit=off' (comma-separated name=value): to attribute a cost, never
    for the figures a README reports."""
    settings = {}
    for part in os.environ.get("PG_SETTINGS", "").split(","):
        if part.strip():
            name, sep, value = part.partition("=")
            if not sep or not name.strip():
                raise SystemExit(f"PG_SETTINGS: {part!r} is not name=value")
            settings[name.strip()] = value.strip()
    return settings


def timings_from_env() -> Timings:
    """The election timings the instances run with: the README defaults unless
    PGLEADER_HEARTBEAT / _LEASE / _EVICT_AFTER say otherwise."""
    return Timings(
        env_float("PGLEADER_HEARTBEAT", 1.0),
        env_float("PGLEADER_LEASE", 3.0),
        env_float("PGLEADER_EVICT_AFTER", 6.0),
    ).validate()


def webhook_body(position: str, instrument: str = "BANK_NIFTY") -> bytes:
    """A distinct BASE_ENTRY signal (the position label makes it unique), stamped now."""
    body = {
        "secret": SECRET,
        "type": "BASE_ENTRY",
        "instrument": instrument,
        "position": position,
        "lots": 1,
        "price": 52000.5,
        "stop": 51500,
        "timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return json.dumps(body).encode()


class Instance:
    """One `pgleader serve` child process. Its logs (JSON) go to a file in the work dir."""

    def __init__(self, dsn: str, instance_id: str, workdir: Path, timings: Timings) -> None:
        self.dsn = dsn
        self.instance_id = instance_id
        self.workdir = workdir
        self.timings = timings
        self.port = free_port()
        self.operator_port = free_port()
        self.log_path = workdir / f"{instance_id}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The public listener (the webhook)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def operator_url(self) -> str:
        """The operator's listener (coordinator, metrics, signals)."""
        return f"http://127.0.0.1:{self.operator_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def application_name(self) -> str:
        """The application_name of its election session (see pgleader.election)."""
        return f"pgleader:gateway:{self.instance_id}"[:63]

    async def start(self, timeout: float = 60) -> None:
        self.port = free_port()  # the previous one may still be in TIME_WAIT
        self.operator_port = free_port()
        # The load client keeps up to LOADGEN_CONNECTIONS (500) open: above the
        # production cap of 256 per listener, which is for TradingView's trickle.
        env = {"PGLEADER_MAX_CONNECTIONS": "2048", **os.environ, "PGLEADER_WEBHOOK_SECRET": SECRET}
        t = self.timings
        with self.log_path.open("ab") as log:
            self.proc = await uninterrupted(asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgleader", "serve", "--dsn", self.dsn,
                "--port", str(self.port), "--operator-port", str(self.operator_port),
                "--instance-id", self.instance_id,
                "--data-dir", str(self.workdir), "--log-format", "json",
                "--heartbeat", str(t.heartbeat), "--lease", str(t.lease),
                "--evict-after", str(t.evict_after),
                stdout=asyncio.subprocess.PIPE, stderr=log, env=env,
            ))  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line or json.loads(line).get("event") != "serving":
            raise RuntimeError(f"{self.instance_id} did not start: {self.log_tail()}")

    def send(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    async def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.send(signal.SIGCONT)
        self.send(signal.SIGTERM)
        try:
            await self.wait_exit(20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def log_tail(self, lines: int = 10) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        return ""


class Cluster:
    """An embedded PostgreSQL, `n` instances on it, and the pgleader_events timeline.

    `events.lines` holds every payload with the monotonic time this process saw it.
    """

    def __init__(
        self,
        n: int,
        timings: Timings,
        settings: dict[str, str] | None = None,
        *,
        proxied: bool = False,
    ) -> None:
        self.timings = timings
        self.proxied = proxied  # each instance reaches the server through its own Proxy
        self.settings = settings or {}  # server settings (ALTER SYSTEM + restart), for profiling
        self.workdir = Path(tempfile.mkdtemp(prefix="pgleader-bench-"))
        os.chmod(self.workdir, 0o755)  # the postgres user must reach its data dir
        self.server = EmbeddedPostgres(self.workdir / "pg")
        self.dsn = self.server.dsn
        self.instances = [
            Instance(self.dsn, f"gw{i}", self.workdir, timings) for i in range(1, n + 1)
        ]
        self.proxies: dict[str, Proxy] = {}
        self.events = Timeline()
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._listen_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Cluster:
        try:
            await uninterrupted(asyncio.to_thread(self.server.start))
            if self.settings:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                    for name, value in self.settings.items():
                        await c.execute(
                            sql.SQL("alter system set {} = {}").format(
                                sql.Identifier(name), sql.Literal(value)
                            )
                        )
                await uninterrupted(asyncio.to_thread(self.server.restart, "fast"))
            await migrate(self.dsn)  # once, before the instances race to do it
            if self.proxied:
                for inst in self.instances:
                    proxy = self.proxies[inst.instance_id] = Proxy("127.0.0.1", self.server.port)
                    port = await proxy.start()
                    inst.dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
            self._db = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            self._listener = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
            await self._listener.execute(
                sql.SQL("listen {}").format(sql.Identifier(EVENTS_CHANNEL))
            )
            self._listen_task = asyncio.create_task(self._listen(self._listener))
            async with asyncio.TaskGroup() as group:  # waits for every start, even on Ctrl-C
                for inst in self.instances:
                    group.create_task(inst.start())
            await self.steady()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await uninterrupted(self._cleanup())

    async def _cleanup(self) -> None:
        await asyncio.gather(*(i.stop() for i in self.instances), return_exceptions=True)
        for proxy in self.proxies.values():
            await proxy.close()
        if self._listen_task is not None:
            self._listen_task.cancel()
            with contextlib.suppress(BaseException):
                await self._listen_task
        for conn in (self._db, self._listener):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self.server.stop("immediate")  # blocking on purpose: nothing else runs by now
        if os.environ.get("BENCH_KEEP"):
            print(f"kept {self.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for n in conn.notifies():
            with contextlib.suppress(ValueError):
                self.events.add(json.loads(n.payload))

    # -- the database, as the benchmark sees it --------------------------------

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self._db is not None
        cur = await self._db.execute(sql, params or None)
        return await cur.fetchall() if cur.description else []

    async def scalar(self, sql: str, *params: Any) -> Any:
        rows = await self.query(sql, *params)
        return rows[0][0] if rows else None

    async def clock(self) -> datetime:
        """The database clock, the one every timestamp in the tables is stamped with."""
        value = await self.scalar("select clock_timestamp()")
        assert isinstance(value, datetime)
        return value

    def by_id(self, instance_id: str) -> Instance:
        return next(i for i in self.instances if i.instance_id == instance_id)

    async def leader(self, timeout: float = 30) -> tuple[Instance, int]:
        """The instance that holds the lock (by the pgleader.leader view) and its epoch."""
        async with asyncio.timeout(timeout):
            while True:
                rows = await self.query(
                    "select leader, epoch from pgleader.leader where election = 'gateway'"
                )
                if rows and rows[0][0] is not None:
                    inst = self.by_id(rows[0][0])
                    if inst.running:
                        return inst, int(rows[0][1])
                await asyncio.sleep(0.02)

    async def following(self, inst: Instance) -> bool:
        """True when the instance's election session waits on the advisory lock."""
        return bool(
            await self.scalar(
                "select exists (select 1 from pg_stat_activity where application_name = %s"
                " and wait_event_type = 'Lock' and wait_event = 'advisory')",
                inst.application_name,
            )
        )

    async def steady(self, timeout: float = 60) -> Instance:
        """Wait until one instance leads and every other one waits on the lock."""
        async with asyncio.timeout(timeout):
            while True:
                leader, _ = await self.leader()
                others = [i for i in self.instances if i is not leader]
                waiting = await asyncio.gather(*(self.following(i) for i in others))
                if all(waiting):
                    return leader
                await asyncio.sleep(0.02)


async def uninterrupted(aw: Awaitable[T]) -> T:
    """Await `aw` to the end even when cancelled meanwhile (Ctrl-C), then re-raise.

    For what must not be cut in half: spawning a child (or it is orphaned),
    starting a server (or it starts after we "stopped" it), cleaning up.
    """
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def until(check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.02) -> None:
    """Bounded polling, for states that show only in the database."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def statement_server() -> AsyncIterator[str]:
    """A migrated embedded PostgreSQL of its own, with election 'gateway' at epoch 1,
    for statement-level benchmarks (no instances); its DSN. Stopped and removed after."""
    tmp = tempfile.mkdtemp(prefix="pgleader-bench-")
    os.chmod(tmp, 0o755)  # the postgres user must reach its data dir
    server = EmbeddedPostgres(Path(tmp) / "pg")
    dsn = server.start()
    try:
        await migrate(dsn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("insert into pgleader.election (name, epoch) values ('gateway', 1)")
        yield dsn
    finally:
        server.stop("fast")
        shutil.rmtree(tmp, ignore_errors=True)


def run_main(main: Callable[[], Coroutine[Any, Any, dict[str, Any]]], name: str) -> int:
    """Run a benchmark: JSON on stdout and in bench/results/<name>.json.

    SIGTERM cancels like Ctrl-C does, so every `finally` runs and nothing is left behind.
    """

    async def wrapped() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main()

    started = time.monotonic()
    try:
        result = run(wrapped())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(result, indent=2, default=str)
    (RESULTS / f"{name}.json").write_text(text + "\n")
    print(text)
    return 0


def progress(text: str) -> None:
    """Progress on stderr, so stdout stays one JSON document."""
    print(text, file=sys.stderr, flush=True)
