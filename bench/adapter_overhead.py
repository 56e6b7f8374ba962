"""`python -m bench.adapter_overhead`: what the OpenAlgo adapter itself costs per order.

One process: the fake OpenAlgo (tests/support/openalgo.py) on 127.0.0.1, live mode
without latency or SMART_ORDER_DELAY, limits far above the load; and three clients
of it taking turns, one order at a time:

    adapter          OpenAlgoBroker.place_many([order]), order_rate 1e6/s (never
                     paced), the gateway's JSON logging set up, written to /dev/null
    adapter_no_log   the same, its logger swapped for one that does nothing
    bare             an aiohttp POST of the same JSON body (bytes built beforehand,
                     the adapter's fields in its order) to the same endpoint, on a
                     ClientSession of its own with the same timeout; answer read
                     as bytes

Each client trades an instrument of its own whose position flips between 0 and one
lot, so every call is a real fill at the fake for all three. WARMUP (50) then N
(2000) calls each, interleaved (adapter, bare, adapter_no_log, adapter, ...) so a
slow moment hits all alike. Per call: wall time (p50/p99) and CPU time of this
process (the fake's share, the same for each, is in all three). The adapter's
overhead is adapter minus bare: building and parsing the JSON, the pacer, the
task per order, the validity check, reading the answer, and its log line
(adapter minus adapter_no_log).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import aiohttp

import service.brokers.openalgo as adapter_module
from bench.harness import env_int, progress, run_main
from bench.procstat import Meter
from bench.stats import summary
from pgleader.logs import configure_logging
from service.brokers.base import Instrument, OrderRequest, OrderResult
from service.brokers.openalgo import OpenAlgoBroker
from tests.support.openalgo import FakeOpenAlgo

__all__ = ["main"]

API_KEY = "bench-openalgo-key-9d2b"
UNLIMITED = 1_000_000
TIMEOUT = 5.0  # the gateway's default broker timeout
STRATEGY = "pgleader"
_VARIANTS = ("adapter", "bare", "adapter_no_log")


class _Silent:
    """A logger that drops everything: the adapter without its log line."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass

    def warning(self, *args: Any, **kwargs: Any) -> None:
        pass


def _order(instrument: Instrument, start: int, target: int, n: int) -> OrderRequest:
    return OrderRequest(
        client_order_id=f"bench-{n}",
        instrument=instrument,
        action="BUY" if target > start else "SELL",
        start=start,
        target=target,
        price=None,
        epoch=1,
        instance_id="bench",
        valid_until=datetime.now(UTC) + timedelta(seconds=60),
    )


def _bare_body(order: OrderRequest) -> bytes:
    """The body the adapter sends for `order` (service/brokers/openalgo.py _send)."""
    i = order.instrument
    fields = {
        "apikey": API_KEY,
        "strategy": STRATEGY,
        "exchange": i.exchange,
        "symbol": i.symbol,
        "action": order.action,
        "product": i.product,
        "pricetype": "MARKET",
        "quantity": "0" if order.reduces else str(order.quantity),
        "position_size": str(order.target),
    }
    return json.dumps(fields).encode()


async def _measure(fake: FakeOpenAlgo, n: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    instruments = {
        name: Instrument(name.upper(), "NFO", f"BENCH{k}FUT", "NRML", lot_size=1)
        for k, name in enumerate(_VARIANTS)
    }
    held = dict.fromkeys(_VARIANTS, 0)
    wall: dict[str, list[float]] = {v: [] for v in _VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in _VARIANTS}
    noisy = adapter_module.log
    brokers = {
        v: OpenAlgoBroker(fake.url, API_KEY, strategy=STRATEGY, mode="live",
                          order_rate=UNLIMITED, timeout=TIMEOUT)
        for v in ("adapter", "adapter_no_log")
    }  # fmt: skip
    url = f"{fake.url}/api/v1/placesmartorder"
    headers = {"Content-Type": "application/json"}
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
    count = 0
    try:
        for broker in brokers.values():
            await broker.start()
        for i in range(warmup + n):
            for variant in _VARIANTS:
                count += 1
                start = held[variant]
                order = _order(instruments[variant], start, 1 - start, count)
                call: Callable[[], Awaitable[Any]]
                if variant == "bare":
                    body = _bare_body(order)

                    async def call(body: bytes = body) -> Any:
                        async with http.post(url, data=body, headers=headers) as response:
                            await response.read()
                            return response.status

                else:
                    broker = brokers[variant]

                    async def call(
                        broker: OpenAlgoBroker = broker, order: OrderRequest = order
                    ) -> Any:
                        return (await broker.place_many([order]))[0]

                adapter_module.log = _Silent() if variant == "adapter_no_log" else noisy
                c0, t0 = time.process_time(), time.perf_counter()
                answer = await call()
                t1, c1 = time.perf_counter(), time.process_time()
                adapter_module.log = noisy
                ok = answer == 200 or (
                    isinstance(answer, OrderResult) and answer.status == "filled"
                )
                if not ok:
                    raise RuntimeError(f"{variant}: the fake did not fill the order: {answer!r}")
                held[variant] = order.target
                if i >= warmup:
                    wall[variant].append((t1 - t0) * 1000)
                    cpu[variant].append((c1 - c0) * 1e6)
    finally:
        adapter_module.log = noisy
        await http.close()
        for broker in brokers.values():
            await broker.close()
    filled = len(fake.orders)
    if filled != count:
        raise RuntimeError(f"{count} orders sent, the fake filled {filled}")
    return {"wall_ms": wall, "cpu_us": cpu}


def _log_to_devnull() -> TextIO:
    """The gateway's JSON logging (so the adapter's log line costs what it costs
    there), written to /dev/null; the stream, to close."""
    configure_logging("json")
    sink = open(os.devnull, "w")  # noqa: SIM115 (closed by the caller)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(sink)
    return sink


async def run() -> dict[str, Any]:
    n = env_int("N", 2000)
    warmup = env_int("WARMUP", 50)
    sink = _log_to_devnull()
    fake = FakeOpenAlgo(
        API_KEY, rate=UNLIMITED, order_rate=UNLIMITED, api_rate=UNLIMITED, smart_order_delay=0.0
    )
    await fake.start()
    meter = Meter({})
    meter.start()
    try:
        samples = await _measure(fake, n, warmup)
    finally:
        await fake.close()
        sink.close()
    usage = await meter.stop()
    wall = {v: summary(samples["wall_ms"][v], 3) for v in _VARIANTS}
    cpu = {v: summary(samples["cpu_us"][v], 1) for v in _VARIANTS}

    def minus(a: dict[str, Any], b: dict[str, Any], digits: int) -> dict[str, float]:
        return {k: round(a[k] - b[k], digits) for k in ("p50", "p99", "mean")}

    overhead = {
        "wall_ms": minus(wall["adapter"], wall["bare"], 3),
        "cpu_us": minus(cpu["adapter"], cpu["bare"], 1),
        "of_which_log_line_wall_ms": minus(wall["adapter"], wall["adapter_no_log"], 3),
        "of_which_log_line_cpu_us": minus(cpu["adapter"], cpu["adapter_no_log"], 1),
        "note": "differences of percentiles, not percentiles of differences",
    }
    for v in _VARIANTS:
        progress(
            f"{v:15} wall p50 {wall[v]['p50']} p99 {wall[v]['p99']} ms,"
            f" cpu p50 {cpu[v]['p50']} mean {cpu[v]['mean']} us"
        )
    progress(
        f"adapter overhead: {overhead['wall_ms']} ms wall, {overhead['cpu_us']} us cpu;"
        f" other processes {usage['other_processes_cpu_s']} cpu s meanwhile"
    )
    return {
        "benchmark": "adapter_overhead",
        "when": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loadavg": os.getloadavg(),
            "note": "the fake, the clients and the event loop share one process",
            "this_process_cpu_s": usage["cpu_s"]["loadgen"],
            "other_processes_cpu_s": usage["other_processes_cpu_s"],
        },
        "config": {"n": n, "warmup": warmup, "fake_latency_s": 0.0, "mode": "live"},
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "wall_ms": wall,
        "cpu_us": cpu,
        "overhead": overhead,
    }


def main() -> int:
    return run_main(run, "adapter_overhead")


if __name__ == "__main__":
    sys.exit(main())
