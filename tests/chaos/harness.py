"""A Jepsen-style campaign: real processes, injected faults, a recorded history.

    PostgreSQL (owned by the campaign: restarted, stopped)
      ^ ^ ^   one blackholing proxy per instance (partitions)
    gw1 gw2 gw3   real `pgleader serve` processes (SIGKILL, SIGSTOP, SIGTERM)
      ^ ^ ^       gw3's data directory (its spool) on a small disk of its own (disk_full)
    load generator: distinct signals round-robin at a steady rate, every
    request and answer logged

Faults come from a seeded schedule, so a failing seed replays. At the end the
faults stop, everything is healed and restarted, the system gets a quiet
period, and `checker.check` reads the log and the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from pgleader.embedded import EmbeddedPostgres
from pgleader.migrations import migrate
from service.intake.signals import fingerprint_raw
from tests.chaos.proxy import BlackholeProxy
from tests.support.diskfull import SmallDisk
from tests.support.gateway import GatewayProcess, signal_body

FAULTS = (
    "kill",
    "pause",
    "partition",
    "restart_fast",
    "restart_immediate",
    "db_down",
    "sigterm",
    "disk_full",
)
# Fast election timings so a campaign fits in minutes; the rules of Timings still hold.
TIMINGS = ["--heartbeat", "0.2", "--lease", "0.6", "--evict-after", "1.2"]
EXTRA = ["--sweep-interval", "0.2", "--broker-timeout", "1.0", "--startup-timeout", "120"]
EVICT_AFTER = 1.2
# The instance whose data directory is on a small disk; big enough for every outage's spool.
DISK_FULL_NODE = "gw3"
SMALL_DISK_BYTES = 4 << 20
# Less room than one spooled record (~310 bytes here): an append that does not fit must be
# refused whole (503), never half-written and answered 202.
DISK_FULL_LEAVE = 200


@dataclass
class Request:
    sent_at: float
    instance: str
    fingerprint: str
    status: int | None  # None: no answer (refused, timed out)
    body: dict[str, Any] | None
    answered_at: float  # or given up on; the instance spooled or refused just before


def answer_of(r: Request) -> str:
    """An answer as the summary counts it: "202 spooled", "503 unavailable", "no answer"."""
    if r.status is None:
        return "no answer"
    return f"{r.status} {(r.body or {}).get('status')}"


@dataclass
class History:
    seed: int
    started: float = field(default_factory=time.monotonic)
    requests: list[Request] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (time, fault, target)
    # each disk_full fault's (database down, disk filled, disk freed, database back) times
    disk_full: list[tuple[float, float, float, float]] = field(default_factory=list)

    # (time, instance, pid, rss_kb, connections): the soak's resource samples
    samples: list[tuple[float, str, int, int, int]] = field(default_factory=list)
    # the breakdown (application_name, state, count) of the most sessions one instance held
    session_peak: dict[str, Any] = field(default_factory=dict)

    def fault(self, kind: str, target: str) -> None:
        self.faults.append((time.monotonic(), kind, target))
        at = time.monotonic() - self.started
        print(f"  fault {kind:18} {target:8} +{at:.1f} s", flush=True)


class Campaign:
    def __init__(self, seed: int, duration: float, rate: float, workdir: Path) -> None:
        self.seed = seed
        self.random = random.Random(seed)
        self.duration = duration
        self.rate = rate
        self.workdir = workdir
        self.history = History(seed)
        self.server = EmbeddedPostgres(workdir / "pg")
        self.proxies: dict[str, BlackholeProxy] = {}
        self.nodes: dict[str, GatewayProcess] = {}
        self.disk: SmallDisk | None = None
        self._load_stop = asyncio.Event()

    # -- set-up ---------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start)
        await migrate(self.server.dsn)
        self.disk = SmallDisk(SMALL_DISK_BYTES)
        for name in ("gw1", "gw2", "gw3"):
            proxy = BlackholeProxy(self.server.port)
            await proxy.start()
            self.proxies[name] = proxy
            dsn = f"host=127.0.0.1 port={proxy.port} user=postgres dbname=postgres"
            data_dir = self.disk.path if name == DISK_FULL_NODE else self.workdir
            self.nodes[name] = GatewayProcess(
                dsn, name, data_dir, *TIMINGS, *EXTRA, log_dir=self.workdir
            )
        await asyncio.gather(*(self.start_node(node) for node in self.nodes.values()))

    async def start_node(self, node: GatewayProcess) -> None:
        """(Re)start an instance; the small disk's limit follows its new process."""
        await node.start()
        if node.instance_id == DISK_FULL_NODE and self.disk is not None:
            assert node.proc is not None
            self.disk.watch(node.proc.pid)

    async def stop(self) -> None:
        try:
            for node in self.nodes.values():
                await node.stop()
            for proxy in self.proxies.values():
                await proxy.stop()
            await asyncio.to_thread(self.server.stop, "immediate")
        finally:
            if self.disk is not None:  # whatever failed: a mount would outlive the campaign
                self.disk.close()

    # -- load -----------------------------------------------------------------

    async def load(self, http: aiohttp.ClientSession) -> None:
        """Distinct signals, round-robin, at a steady rate; every answer is logged."""
        names = list(self.nodes)
        interval = 1.0 / self.rate
        pending: set[asyncio.Task[None]] = set()
        n = 0
        next_at = time.monotonic()
        while not self._load_stop.is_set():
            node = self.nodes[names[n % len(names)]]
            body = signal_body(position=f"S{self.seed}_{n}")
            task = asyncio.create_task(self._post(http, node, body))
            pending.add(task)
            task.add_done_callback(pending.discard)
            n += 1
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._load_stop.wait(), max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*pending)

    async def _post(
        self, http: aiohttp.ClientSession, node: GatewayProcess, body: dict[str, Any]
    ) -> None:
        sent = time.monotonic()
        status: int | None = None
        answer: dict[str, Any] | None = None
        try:
            async with http.post(f"{node.url}/webhook", json=body) as resp:
                status = resp.status
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            pass  # refused, reset or timed out: no answer, no promise made
        self.history.requests.append(
            Request(sent, node.instance_id, fingerprint_raw(body), status, answer, time.monotonic())
        )

    # -- soak -----------------------------------------------------------------

    async def sample(self, every: float = 2.0) -> None:
        """Each instance's RSS and its sessions in pg_stat_activity, every few seconds."""
        import psycopg

        while not self._load_stop.is_set():
            with contextlib.suppress(Exception):
                async with await psycopg.AsyncConnection.connect(
                    self.server.dsn, autocommit=True
                ) as c:
                    cur = await c.execute(
                        "select application_name, coalesce(state, ''), count(*)"
                        " from pg_stat_activity where application_name like '%%:gw_'"
                        " group by 1, 2"
                    )
                    rows = await cur.fetchall()
                    if os.environ.get("CHAOS_TRACE_SESSIONS"):
                        cur = await c.execute(
                            "select application_name, pid, backend_start::time,"
                            " state_change::time, client_port, state"
                            " from pg_stat_activity where application_name like 'gateway-listen%%'"
                        )
                        print(
                            "  sessions",
                            time.strftime("%H:%M:%S"),
                            await cur.fetchall(),
                            flush=True,
                        )
                sessions: dict[str, int] = {}
                for app, _, n in rows:
                    name = app.rsplit(":", 1)[-1]
                    sessions[name] = sessions.get(name, 0) + n
                for name, n in sessions.items():
                    if n > self.history.session_peak.get("sessions", 0):
                        self.history.session_peak = {
                            "instance": name,
                            "sessions": n,
                            "by_application_and_state": sorted(
                                (app, state, k)
                                for app, state, k in rows
                                if app.rsplit(":", 1)[-1] == name
                            ),
                        }
                for name, node in self.nodes.items():
                    if node.proc is not None and node.proc.returncode is None:
                        rss = _rss_kb(node.proc.pid)
                        if rss:
                            self.history.samples.append(
                                (time.monotonic(), name, node.proc.pid, rss, sessions.get(name, 0))
                            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._load_stop.wait(), every)

    # -- faults ---------------------------------------------------------------

    async def leader(self, timeout: float = 30) -> GatewayProcess | None:
        """The instance the database names as leader, if one is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                import psycopg

                async with await psycopg.AsyncConnection.connect(
                    self.server.dsn, autocommit=True
                ) as c:
                    cur = await c.execute(
                        "select leader from pgleader.leader where election = 'gateway'"
                    )
                    row = await cur.fetchone()
                    if row and row[0] in self.nodes and self.nodes[row[0]].proc.returncode is None:
                        return self.nodes[row[0]]
            await asyncio.sleep(0.1)
        return None

    async def inject(self, kind: str) -> None:
        rnd = self.random
        if kind in ("restart_fast", "restart_immediate"):
            mode = kind.split("_")[1]
            self.history.fault(kind, "postgres")
            await asyncio.to_thread(self.server.restart, mode)
            return
        if kind == "db_down":
            self.history.fault(kind, "postgres")
            await asyncio.to_thread(self.server.stop, "fast")
            await asyncio.sleep(rnd.uniform(2, 4))
            await asyncio.to_thread(self.server.start)
            return
        if kind == "disk_full":
            await self.disk_full()
            return
        target = await self.leader()
        if target is None:
            return
        name = target.instance_id
        self.history.fault(kind, name)
        if kind == "kill":
            target.signal(signal.SIGKILL)
            await target.wait()
            await asyncio.sleep(rnd.uniform(0.5, 2))
            await self.start_node(target)
        elif kind == "sigterm":
            target.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await target.wait(40)
            await self.start_node(target)
        elif kind == "pause":
            target.signal(signal.SIGSTOP)
            await asyncio.sleep(EVICT_AFTER + rnd.uniform(0.5, 2))
            target.signal(signal.SIGCONT)
        elif kind == "partition":
            proxy = self.proxies[name]
            proxy.blackhole()
            await asyncio.sleep(EVICT_AFTER + rnd.uniform(0.5, 3))
            proxy.heal()

    async def disk_full(self) -> None:
        """PostgreSQL down while one instance's data directory fills up, then frees.

        The database goes first and the disk fills once the instance has spooled a
        signal, so its spool file ends part way through a block: the next appends
        fit, or are cut short crossing into a block the full disk cannot give. Each
        signal it cannot spool whole must be answered 503 (TradingView retries 5xx);
        once the disk is freed, still in the outage, it spools (202) again. Each
        phase lasts until the instance has given the answer it is there to provoke
        (bounded): an answer in an outage waits for the pool's timeout first.
        """
        assert self.disk is not None
        rnd = self.random
        self.history.fault("disk_full", DISK_FULL_NODE)
        down = time.monotonic()
        await asyncio.to_thread(self.server.stop, "fast")
        await self._answered(down, "202 spooled", 1, at_least=rnd.uniform(0.3, 0.8), at_most=4)
        await asyncio.to_thread(self.disk.fill, DISK_FULL_LEAVE)
        filled = time.monotonic()
        await self._answered(filled, "503", 1, at_least=rnd.uniform(1.5, 2.5), at_most=6)
        await asyncio.to_thread(self.disk.free)
        freed = time.monotonic()
        await self._answered(freed, "202 spooled", 2, at_least=rnd.uniform(1.0, 2.0), at_most=6)
        await asyncio.to_thread(self.server.start)
        self.history.disk_full.append((down, filled, freed, time.monotonic()))

    async def _answered(
        self, since: float, answer: str, n: int, *, at_least: float, at_most: float
    ) -> None:
        """Wait `at_least` seconds, then until the small-disk instance has given `n`
        answers starting with `answer` (e.g. "503", "202 spooled") since `since`;
        `at_most` seconds from `since` in all."""

        def given() -> int:
            total = 0
            for r in reversed(self.history.requests):  # in the order answered
                if r.answered_at < since:
                    break
                if r.instance == DISK_FULL_NODE and answer_of(r).startswith(answer):
                    total += 1
            return total

        await asyncio.sleep(at_least)
        while time.monotonic() < since + at_most:
            if given() >= n:
                return
            await asyncio.sleep(0.1)

    async def faults(self, kinds: list[str]) -> None:
        for kind in kinds:
            await asyncio.sleep(self.random.uniform(1.0, 2.5))
            await self.inject(kind)

    def schedule(self, count: int) -> list[str]:
        """Every fault kind at least once when count allows, then random ones, shuffled."""
        kinds = list(FAULTS)[:count] + [
            self.random.choice(FAULTS) for _ in range(count - len(FAULTS))
        ]
        self.random.shuffle(kinds)
        return kinds

    # -- the run --------------------------------------------------------------

    async def run(self, fault_count: int, quiet: float = 60) -> dict[str, Any]:
        from tests.chaos.checker import check

        kinds = self.schedule(fault_count)
        print(f"chaos seed={self.seed} faults={kinds}", flush=True)
        await self.start()
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            load = asyncio.create_task(self.load(http))
            sampler = asyncio.create_task(self.sample())
            started = time.monotonic()
            try:
                await self.faults(kinds)
                await asyncio.sleep(max(0.0, self.duration - (time.monotonic() - started)))
            finally:  # a fault that raised still lets the load finish on an open session
                self._load_stop.set()
                await load
                await sampler
        await self.heal_all()
        return await check(self, quiet)

    async def heal_all(self) -> None:
        if self.disk is not None:
            await asyncio.to_thread(self.disk.free)
        for proxy in self.proxies.values():
            proxy.heal()
        if not await asyncio.to_thread(self.server.is_running):
            await asyncio.to_thread(self.server.start)
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)
            if node.proc is None or node.proc.returncode is not None:
                await self.start_node(node)


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _disk_full_row(d: dict[str, Any]) -> str:
    def answers(phase: dict[str, int]) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(phase.items())) or "nothing"

    return (
        f"disk_full x{d['faults']} on {DISK_FULL_NODE} ({d['mode']}): while full {answers(d['full'])};"
        f" once freed {answers(d['freed'])}"
    )


def summary(result: dict[str, Any]) -> str:
    faults = Counter(kind for _, kind, _ in result["faults"])
    rows = [
        f"seed {result['seed']}: {'PASS' if not result['violations'] else 'FAIL'}",
        f"  requests {result['requests']}, 2xx {result['accepted']}, no answer {result['unanswered']}",
        "  answers: " + ", ".join(f"{k} x{v}" for k, v in sorted(result["answers"].items())),
        f"  2xx signals executed {result['executed']}, terminal with alert {result['terminal']};"
        f" inbox {result['inbox']} (a signal stored before its instance died unanswered still runs)",
        f"  epochs {result['epochs']}, broker requests {result['broker_requests']}",
        "  faults: " + ", ".join(f"{k} x{v}" for k, v in sorted(faults.items())),
        f"  202 spooled answers {result['spooled_answers']}, each checked in the inbox;"
        f" spool lines quarantined {result['quarantined']}",
        f"  {_disk_full_row(result['disk_full'])}",
        "  invariants: " + ", ".join(result["invariants"]),
        f"  soak: RSS per instance {result['soak']['rss_mb']} MB (first -> last -> max of the"
        f" longest-lived process), sessions per instance max {result['soak']['max_sessions']}",
    ]
    rows += [f"  VIOLATION {v}" for v in result["violations"]]
    return "\n".join(rows)


async def campaign(seed: int, duration: float, faults: int, rate: float = 20.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"pgleader-chaos-{seed}-"))
    os.chmod(workdir, 0o755)
    c = Campaign(seed, duration, rate, workdir)
    try:
        result = await c.run(faults)
        result["finished_at"] = datetime.now(UTC).isoformat()
        return result
    finally:
        await c.stop()
        if not os.environ.get("CHAOS_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
