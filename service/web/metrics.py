"""GET /metrics: one instance's figures, exposed with prometheus-client.

One registry per application (never the client's global one): the election's
families (pgleader.metrics.ElectionCollector), the gateway's (GatewayCollector,
over what `Gateway.stats()` and the listeners already count in memory), the
process and platform collectors, a build-info gauge, and the one observation on
the request path: each HTTP request's duration by listener, route and status code.
A scrape runs no query (the database-derived gauges are the gateway's count of a
few seconds ago, with its age), so /metrics answers at once while the database
is down. README "Metrics" lists every family.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from pgleader import __version__
from pgleader.metrics import ElectionCollector, histogram_family
from service.web.listener import Rejections

__all__ = ["Metrics"]

# An HTTP request, s: the webhook answers in milliseconds; TradingView gives up at 3 s.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
_KILL_SWITCH_MODES = ("running", "halted", "entries_only", "rewound")
_RECONCILIATION_OUTCOMES = ("matched", "mismatch", "failed")


class _Gateway(Protocol):
    def stats(self) -> dict[str, Any]: ...


class Metrics:
    """The registry of one gateway process, and the request-duration middleware."""

    def __init__(self, gateway: _Gateway, rejections: Rejections) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        elector = getattr(gateway, "elector", None)
        if elector is not None:
            self.registry.register(ElectionCollector(elector, getattr(gateway, "jobs", None)))
        self.registry.register(GatewayCollector(gateway, rejections))
        self.requests = Histogram(
            "gateway_http_request_duration_seconds",
            "HTTP requests by listener, route and status code: time to the answer",
            ["listener", "route", "code"],
            buckets=_REQUEST_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST

    def middleware(self, listener: str) -> Any:
        """Times every request of `listener` to its answer (whatever answers it)."""
        requests = self.requests

        @web.middleware
        async def timed(request: web.Request, handler: Handler) -> web.StreamResponse:
            began = time.perf_counter()
            code = 500
            try:
                response = await handler(request)
                code = response.status
                return response
            except web.HTTPException as exc:
                code = exc.status
                raise
            finally:
                info = request.match_info
                route = info.route.resource.canonical if info.route.resource else "unmatched"
                requests.labels(listener, route, str(code)).observe(time.perf_counter() - began)

        return timed


class GatewayCollector(Collector):
    """The gateway_* families, from `Gateway.stats()` and the listeners' refusals."""

    def __init__(self, gateway: _Gateway, rejections: Rejections) -> None:
        self.gateway, self.rejections = gateway, rejections

    def collect(self) -> Iterator[Metric]:
        stats = self.gateway.stats()
        build = GaugeMetricFamily("pgleader_build_info", "This process's version (value 1)",
                                  labels=["version", "python"])  # fmt: skip
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        yield from self._signals(stats)
        yield from self._spool(stats["spool"])
        yield from self._broker(stats)
        yield from self._database(stats)
        yield from self._alerts(stats)
        yield from self._redis(stats)
        yield from self._state(stats)

    def _signals(self, stats: dict[str, Any]) -> Iterator[Metric]:
        yield _counter("gateway_webhook_answers", "Webhook answers by outcome",
                       "status", stats["answers"])  # fmt: skip
        yield _counter("gateway_webhook_invalid", "Webhooks with the right secret or"
                       " signature refused as invalid (400, nothing stored): lost trades,"
                       " TradingView does not retry", None, stats["webhooks_invalid"])  # fmt: skip
        yield _counter("gateway_executions", "Signals this instance ended, by outcome"
                       " (executed, failed, expired, rejected, in_doubt, ...)", "result",
                       stats["executions"])  # fmt: skip
        batches = stats["execution_batches"]
        yield _counter("gateway_execution_batches", "Claims of signals (batches)", None,
                       batches["batches"])  # fmt: skip
        yield _counter("gateway_execution_batch_signals", "Signals in those claims", None,
                       batches["signals"])  # fmt: skip
        writes = stats["inbox_writes"]
        yield _counter("gateway_inbox_writes", "Inbox writes (group commits)", None,
                       writes["writes"])  # fmt: skip
        yield _counter("gateway_inbox_write_signals", "Signals in those writes", None,
                       writes["signals"])  # fmt: skip
        yield histogram_family(
            "gateway_inbox_write_seconds",
            "Time to commit an inbox write: mostly the WAL flush every answer waits for",
            {(): stats["inbox_write_seconds"]},
        )
        yield histogram_family(
            "gateway_signal_execution_latency_seconds",
            "A signal's arrival (any instance's inbox) to its order recorded, by this leader",
            {(): stats["received_to_executed"]},
        )
        if stats["open_signals"] is not None:
            open_signals = GaugeMetricFamily(
                "gateway_signals",
                "Signals not yet ended, by status (the database's count, a few seconds old)",
                labels=["status"],
            )
            for status, n in sorted(stats["open_signals"].items()):
                open_signals.add_metric([status], n)
            yield open_signals
            yield GaugeMetricFamily(
                "gateway_signals_count_age_seconds",
                "Age of that count (grows while the database cannot be asked)",
                value=round(stats["open_signals_age"], 3),
            )
            oldest = GaugeMetricFamily(
                "gateway_signal_oldest_age_seconds",
                "Seconds since the oldest signal of each status not yet ended was received"
                " (0: none); as of that count, plus the count's age",
                labels=["status"],
            )
            for status in sorted(stats["open_signals"]):
                age = stats["oldest_open_signal"].get(status)
                since = 0.0 if age is None else age + stats["open_signals_age"]
                oldest.add_metric([status], round(since, 3))
            yield oldest

    def _spool(self, spool: dict[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily("gateway_spooled_signals", "Signals in the outage spool,"
                                " waiting for the database", value=spool["records"])  # fmt: skip
        yield GaugeMetricFamily("gateway_spool_bytes", "Size of the outage spool",
                                value=spool["bytes"])  # fmt: skip
        yield GaugeMetricFamily("gateway_spool_max_bytes", "The spool's limit (then 503)",
                                value=spool["max_bytes"])  # fmt: skip
        yield _counter("gateway_spool_refused", "Signals the spool could not take (full"
                       " or failing disk): answered 503", None, spool["refused"])  # fmt: skip
        yield _counter("gateway_spool_quarantined", "Spooled records that could not be"
                       " replayed, set aside", None, spool["quarantined"])  # fmt: skip

    def _broker(self, stats: dict[str, Any]) -> Iterator[Metric]:
        broker = stats["broker"]
        calls = CounterMetricFamily("gateway_broker_requests", "Calls to the broker by"
                                    " operation and outcome", labels=["operation", "outcome"])  # fmt: skip
        for (operation, outcome), n in sorted(broker["calls"].items()):
            calls.add_metric([operation, outcome], n)
        yield calls
        yield histogram_family("gateway_broker_request_duration_seconds",
                               "Duration of a call to the broker, by operation",
                               broker["seconds"], ["operation"])  # fmt: skip
        yield _counter("gateway_broker_orders", "Orders' answers from the broker, by outcome",
                       "outcome", broker["orders"])  # fmt: skip

    def _alerts(self, stats: dict[str, Any]) -> Iterator[Metric]:
        yield _counter("gateway_alert_deliveries", "Alert deliveries (an alert or a"
                       " leadership change for one sink) by this instance: delivered, and"
                       " attempts that failed", "result", stats["alert_deliveries"])  # fmt: skip

    def _redis(self, stats: dict[str, Any]) -> Iterator[Metric]:
        operations = CounterMetricFamily(
            "gateway_redis_operations",
            "Commands to the optional Redis cache by operation and outcome (none without it)",
            labels=["operation", "outcome"],
        )
        for (operation, outcome), n in sorted((stats.get("redis") or {}).items()):
            operations.add_metric([operation, outcome], n)
        yield operations

    def _database(self, stats: dict[str, Any]) -> Iterator[Metric]:
        pool = stats["pool"]
        yield GaugeMetricFamily("gateway_db_pool_connections", "Connections the pool holds",
                                value=pool.get("pool_size", 0))  # fmt: skip
        yield GaugeMetricFamily("gateway_db_pool_connections_idle", "Of those, idle",
                                value=pool.get("pool_available", 0))  # fmt: skip
        yield GaugeMetricFamily("gateway_db_pool_max_connections", "The pool's limit",
                                value=pool.get("pool_max", 0))  # fmt: skip
        yield GaugeMetricFamily("gateway_db_pool_requests_waiting", "Callers waiting for a"
                                " connection now", value=pool.get("requests_waiting", 0))  # fmt: skip
        yield _counter("gateway_db_pool_requests", "Connections asked of the pool", None,
                       pool.get("requests_num", 0))  # fmt: skip
        yield _counter("gateway_db_pool_requests_queued", "Of those, that had to wait", None,
                       pool.get("requests_queued", 0))  # fmt: skip
        yield _counter("gateway_db_pool_request_errors", "Of those, not served (timeout,"
                       " database down)", None, pool.get("requests_errors", 0))  # fmt: skip
        yield _counter("gateway_db_pool_connection_errors", "Connections the pool failed to"
                       " open", None, pool.get("connections_errors", 0))  # fmt: skip
        yield _counter("gateway_db_pool_connections_lost", "Connections found broken", None,
                       pool.get("connections_lost", 0))  # fmt: skip

    def _state(self, stats: dict[str, Any]) -> Iterator[Metric]:
        rejections = CounterMetricFamily(
            "gateway_http_rejections",
            "Requests refused (4xx, 503 busy) by listener, code and reason: an attack shows here",
            labels=["listener", "code", "reason"],
        )
        for (listener, code, reason), n in sorted(self.rejections.counts.items()):
            rejections.add_metric([listener, str(code), reason], n)
        yield rejections
        halt = GaugeMetricFamily("gateway_trading_halt", "The kill switch as last read:"
                                 " 1 on its mode", labels=["mode"])  # fmt: skip
        if stats["trading_halt"] is not None:
            for mode in _KILL_SWITCH_MODES:
                halt.add_metric([mode], int(stats["trading_halt"] == mode))
        yield halt
        last = GaugeMetricFamily("gateway_last_reconciliation", "The last comparison of"
                                 " the ledger with the broker by this instance: 1 on its"
                                 " outcome", labels=["outcome"])  # fmt: skip
        if stats["last_reconciliation"] is not None:
            for outcome in _RECONCILIATION_OUTCOMES:
                last.add_metric([outcome], int(stats["last_reconciliation"] == outcome))
        yield last


def _counter(name: str, documentation: str, label: str | None, value: Any) -> Metric:
    """A counter family: one sample, or one per item of `value` (a dict) by `label`."""
    family = CounterMetricFamily(name, documentation, labels=[label] if label else None)
    if label is None:
        family.add_metric([], value)
    else:
        for key, n in sorted(value.items()):
            family.add_metric([str(key)], n)
    return family
