"""`python -m bench.burst`: a bar close. TradingView fires every strategy's alert in
the same second; how fast do their orders reach an OpenAlgo that allows 10 a second?

One `pgleader serve` instance (the leader) with PGLEADER_BROKER=openalgo on an
embedded PostgreSQL, against the fake OpenAlgo (tests/support/openalgo.py) in a
process of its own: analyze (sandbox) mode, LATENCY (100 ms) on every order call,
its smart-order limit LIMIT (10/s, flask-limiter's moving one-second window,
answering 429). The gateway is told the same rate (PGLEADER_OPENALGO_ORDER_RATE,
LIMIT unless set). Each run posts SIGNALS (50) BASE_ENTRY signals, one per
instrument of its own (a fresh set per run: nothing held yet), all at once over
fresh HTTP connections, then waits until the database has every one of them
executed. Per run:

    first post -> last order   wall time from the first post to the last order the
                               fake placed (its own stamp, in microseconds; same
                               machine, same clock)
    order rate                 orders / (last order - first order), at the fake;
                               also (orders - 1) / that span (the spacing rate) and
                               each against LIMIT; the most orders in any one
                               second (must stay <= LIMIT)
    gaps                       between consecutive orders: where time goes
    429                        answered by the fake during the run
    executed once              every signal 'executed' with exactly one 'filled'
                               order row (refused ones show as 'not_sent' rows),
                               one order per symbol at the fake, each at one lot
    webhook answers            post -> answer (p50/p99/max) and the answers; the
                               leader answers `200 executed` when the order is
                               recorded within its inline timeout (2 s), else 202

A warm-up signal goes first (not reported). Knobs: RUNS (3), SIGNALS (50), LATENCY
(0.1 s), LIMIT (10/s), GAP (2 s between runs), SETTLE_TIMEOUT (60 s); any other
PGLEADER_* setting of `serve` (e.g. PGLEADER_OPENALGO_ORDER_RATE) is inherited.

`python -m bench.burst --fake --api-key K --rate R` is the fake's process (the
fake, plus GET /_bench/orders: every order with its placement time as a float).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.harness import (
    Cluster,
    env_float,
    env_int,
    progress,
    run_main,
    settings_from_env,
    timings_from_env,
    uninterrupted,
    webhook_body,
)
from bench.procstat import Meter
from bench.stats import summary
from tests.support.openalgo import FakeOpenAlgo

__all__ = ["main"]

API_KEY = "bench-openalgo-key-5c1e"
LOT_SIZE = 1

_SIGNALS = """
select s.id, s.status, extract(epoch from s.received_at), extract(epoch from s.finished_at),
       count(o.id) filter (where o.outcome = 'filled'),
       count(o.id) filter (where o.outcome = 'not_sent'),
       count(o.id)
  from gateway.signals s left join gateway.orders o on o.signal_id = s.id
 where s.instrument = any(%s)
 group by s.id
"""


class _TimedFake(FakeOpenAlgo):
    """The fake, with each order's placement time to the microsecond (its orderbook
    stamps whole seconds, as OpenAlgo does: too coarse for a rate over 5 s)."""

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/_bench/orders", self._timed_orders)
        return app

    async def _timed_orders(self, request: web.Request) -> web.Response:
        orders = [
            {"symbol": o.symbol, "action": o.action, "quantity": o.quantity,
             "placed_at": o.placed_at.timestamp()}
            for o in self.orders
        ]  # fmt: skip
        positions = {symbol: held.quantity for (symbol, _, _), held in self.book.items()}
        answers = {str(status): n for status, n in sorted(self.answers.items())}
        return web.json_response({"orders": orders, "positions": positions, "answers": answers})


def _serve_fake(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst --fake")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--rate", type=int, default=10, help="smart orders per second")
    args = parser.parse_args(argv)

    async def serve() -> None:
        fake = _TimedFake(args.api_key, rate=args.rate)
        url = await fake.start("127.0.0.1", 0)
        print(f"ready {url}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.close()

    asyncio.run(serve())
    return 0


@contextlib.asynccontextmanager
async def _fake_process(limit: int) -> AsyncIterator[tuple[str, int]]:
    """The fake in a process of its own: (url, pid); stopped on the way out."""
    proc = await uninterrupted(asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.burst", "--fake", "--api-key", API_KEY,
        "--rate", str(limit), stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ))  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"the fake OpenAlgo did not start: {line!r}")
        yield line.split()[1], proc.pid
    finally:
        if proc.returncode is None:
            proc.terminate()
            await uninterrupted(proc.wait())


def _instruments_file(path: Path, names: list[str]) -> None:
    tables = [
        f'[instruments.{name}]\nexchange = "NFO"\nsymbol = "{_symbol(name)}"\n'
        f'product = "NRML"\nlot_size = {LOT_SIZE}\n'
        for name in names
    ]
    path.write_text("\n".join(tables))


def _symbol(name: str) -> str:
    return f"{name.replace('_', '')}FUT"


def _names(run: int, n: int) -> list[str]:
    return [f"BURST{run}_{i:03d}" for i in range(n)]


async def _post_all(url: str, names: list[str]) -> tuple[float, list[tuple[str, float]]]:
    """Post one signal per name at once, each on a fresh connection (as separate
    alerts arrive). (wall time of the first post, [(answer, seconds)])."""
    bodies = [webhook_body("Long_1", name) for name in names]
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as http:

        async def post(body: bytes) -> tuple[str, float]:
            began = time.perf_counter()
            try:
                async with http.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    answer = await response.json()
                    word = f"{response.status} {answer.get('status')}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                word = f"error {type(exc).__name__}"
            return word, time.perf_counter() - began

        first_post = time.time()
        answers = await asyncio.gather(*(post(body) for body in bodies))
    return first_post, answers


async def _fake_view(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/_bench/orders") as response:
        return dict(await response.json())


async def _leader_metrics(http: aiohttp.ClientSession, operator_url: str) -> dict[str, Any]:
    async with http.get(f"{operator_url}/coordinator/leader") as response:
        return dict((await response.json())["metrics"])


async def _settled(cluster: Cluster, names: list[str], timeout: float) -> list[tuple[Any, ...]]:
    """The run's signals once none is pending or executing (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await cluster.query(_SIGNALS, names)
        done = len(rows) >= len(names) and all(r[1] not in ("pending", "executing") for r in rows)
        if done or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def _most_in_a_second(times: list[float]) -> int:
    most, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


async def _burst(
    cluster: Cluster, http: aiohttp.ClientSession, fake_url: str, fake_pid: int,
    run: int, n: int, limit: int,
) -> dict[str, Any]:  # fmt: skip
    names = _names(run, n)
    symbols = {_symbol(name) for name in names}
    leader, epoch = await cluster.leader()
    before = await _fake_view(http, fake_url)
    metrics_before = await _leader_metrics(http, leader.operator_url)
    meter = Meter(
        {leader.instance_id: leader.pid, "fake": fake_pid}, cluster.server.postmaster_pid()
    )
    meter.start()
    first_post, answers = await _post_all(f"{leader.url}/webhook", names)
    rows = await _settled(cluster, names, env_float("SETTLE_TIMEOUT", 60.0))
    usage = await meter.stop()
    after = await _fake_view(http, fake_url)
    metrics_after = await _leader_metrics(http, leader.operator_url)
    _, epoch_after = await cluster.leader()

    orders = [o for o in after["orders"][len(before["orders"]) :] if o["symbol"] in symbols]
    times = sorted(o["placed_at"] for o in orders)
    per_symbol = Counter(o["symbol"] for o in orders)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    rate = len(times) / span if span else None
    spacing_rate = (len(times) - 1) / span if span else None
    answers_429 = after["answers"].get("429", 0) - before["answers"].get("429", 0)
    statuses = Counter(r[1] for r in rows)
    executed_once = (
        len(rows) == n
        and all(r[1] == "executed" and r[4] == 1 for r in rows)
        and len(per_symbol) == n
        and all(count == 1 for count in per_symbol.values())
        and all(after["positions"].get(s) == LOT_SIZE for s in symbols)
    )
    finished = [r[3] for r in rows if r[3] is not None]
    received = [r[2] for r in rows]
    latencies = [seconds * 1000 for _, seconds in answers]
    executions = _delta(metrics_after["executions"], metrics_before["executions"])
    batches = (
        metrics_after["execution_batches"]["batches"]
        - metrics_before["execution_batches"]["batches"]
    )
    report = {
        "run": run,
        "signals": n,
        "leadership_changed": epoch_after != epoch,
        "first_post_to_first_order_s": round(times[0] - first_post, 3) if times else None,
        "first_post_to_last_order_s": round(times[-1] - first_post, 3) if times else None,
        "first_post_to_last_recorded_s": (
            round(float(max(finished)) - first_post, 3) if finished else None
        ),
        "first_post_to_last_stored_s": round(float(max(received)) - first_post, 3)
        if received
        else None,
        "ideal_first_post_to_last_order_s": (
            round(times[0] - first_post + (n - 1) / limit, 3) if times else None
        ),
        "orders_at_fake": len(orders),
        "order_span_s": round(span, 3),
        "orders_per_s": round(rate, 2) if rate else None,
        "orders_per_s_of_limit": round(rate / limit, 3) if rate else None,
        "spacing_rate_per_s": round(spacing_rate, 2) if spacing_rate else None,
        "spacing_rate_of_limit": round(spacing_rate / limit, 3) if spacing_rate else None,
        "most_orders_in_one_second": _most_in_a_second(times),
        "gaps_between_orders_ms": summary(gaps),
        "longest_gap_after_order": gaps.index(max(gaps)) + 1 if gaps else None,
        "answers_429_at_fake": answers_429,
        "signal_statuses": dict(statuses),
        "filled_orders": sum(r[4] for r in rows),
        "not_sent_orders": sum(r[5] for r in rows),
        "order_rows": sum(r[6] for r in rows),
        "executed_once": executed_once,
        "webhook_answers": dict(Counter(word for word, _ in answers)),
        "webhook_answer_ms": summary(latencies),
        "over_3s": sum(ms > 3000 for ms in latencies),
        "executor": {"batches": batches, "counts": executions},
        "cpu_s": usage["cpu_s"],
        "other_processes_cpu_s": usage["other_processes_cpu_s"],
    }
    lat = report["webhook_answer_ms"]
    progress(
        f"run {run}: first post -> last order {report['first_post_to_last_order_s']} s"
        f" (ideal {report['ideal_first_post_to_last_order_s']} s), {len(orders)} orders at"
        f" {report['orders_per_s']}/s ({report['orders_per_s_of_limit']} of {limit}/s; spacing"
        f" {report['spacing_rate_per_s']}/s), gaps p50 {report['gaps_between_orders_ms']['p50']}"
        f" max {report['gaps_between_orders_ms']['max']} ms, 429s {answers_429}, executed once"
        f" {executed_once}, answers {report['webhook_answers']}, answer p50 {lat['p50']} p99"
        f" {lat['p99']} ms, batches {batches}, other processes {usage['other_processes_cpu_s']} cpu s"
    )
    return report


async def _warm_up(cluster: Cluster, name: str) -> None:
    leader, _ = await cluster.leader()
    await _post_all(f"{leader.url}/webhook", [name])
    await _settled(cluster, [name], 30.0)


async def run() -> dict[str, Any]:
    runs = env_int("RUNS", 3)
    n = env_int("SIGNALS", 50)
    latency = env_float("LATENCY", 0.1)
    limit = env_int("LIMIT", 10)
    gap = env_float("GAP", 2.0)
    os.environ.setdefault("PGLEADER_OPENALGO_ORDER_RATE", str(limit))
    order_rate = float(os.environ["PGLEADER_OPENALGO_ORDER_RATE"])
    timings = timings_from_env()
    result: dict[str, Any] = {
        "benchmark": "burst",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "note": "the load client, the gateway, PostgreSQL and the fake share these CPUs",
            "loadavg_at_start": os.getloadavg(),
        },
        "config": {
            "runs": runs,
            "signals": n,
            "fake": {"latency_s": latency, "smart_order_limit_per_s": limit, "mode": "analyze"},
            "gateway": {"instances": 1, "openalgo_order_rate": order_rate},
            "rate_definition": "orders / (last order - first order), placement times at the"
            " fake; spacing rate: (orders - 1) / the same span",
        },
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    warm = "BURSTWARM"
    with tempfile.TemporaryDirectory(prefix="pgleader-burst-") as tmp:
        instruments = Path(tmp) / "instruments.toml"
        _instruments_file(
            instruments, [warm] + [x for r in range(1, runs + 1) for x in _names(r, n)]
        )
        async with _fake_process(limit) as (fake_url, fake_pid), aiohttp.ClientSession() as http:
            async with http.post(
                f"{fake_url}/_fake/faults", json={"analyze": True, "latency": latency}
            ) as response:
                response.raise_for_status()
            os.environ.update({
                "PGLEADER_BROKER": "openalgo",
                "PGLEADER_INSTRUMENTS_FILE": str(instruments),
                "PGLEADER_OPENALGO_URL": fake_url,
                "PGLEADER_OPENALGO_API_KEY": API_KEY,
                "PGLEADER_OPENALGO_MODE": "analyze",
            })  # fmt: skip
            async with Cluster(1, timings, settings_from_env()) as cluster:
                progress(f"1 instance with openalgo at {fake_url}, PostgreSQL at {cluster.dsn}")
                await _warm_up(cluster, warm)
                reports = []
                for r in range(1, runs + 1):
                    await asyncio.sleep(gap)  # the limiter's window and the pacer start empty
                    reports.append(await _burst(cluster, http, fake_url, fake_pid, r, n, limit))
    result["runs"] = reports
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["targets"] = [
        {
            "target": f">= 95 % of {limit}/s over the burst (orders / span at the fake)",
            "value": [r["orders_per_s_of_limit"] for r in reports],
            "pass": all((r["orders_per_s_of_limit"] or 0) >= 0.95 for r in reports),
        },
        {
            "target": "no signal lost: every one executed once (database and fake)",
            "value": [r["executed_once"] for r in reports],
            "pass": all(r["executed_once"] for r in reports),
        },
    ]
    for check in result["targets"]:
        progress(f"{'PASS' if check['pass'] else 'FAIL'}  {check['target']}: {check['value']}")
    return result


def main() -> int:
    if sys.argv[1:2] == ["--fake"]:
        return _serve_fake(sys.argv[2:])
    return run_main(run, "burst")


if __name__ == "__main__":
    sys.exit(main())
