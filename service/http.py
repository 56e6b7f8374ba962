"""The HTTP surface: webhook, health, readiness, leader, signals, metrics, admin.

Every answer is JSON with a `status`; errors add `error` (and `field` for a bad
signal). Nothing is stored unless the body is valid and authenticated.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from psycopg_pool import PoolTimeout

from service.app import Gateway
from service.auth import (
    SIGNATURE_HEADER,
    admin_ok,
    body_secret_ok,
    ip_allowed,
    secret_ok,
    signature_ok,
)
from service.inbox import get_signal
from service.signals import SignalError, fingerprint, parse_body

__all__ = ["GATEWAY", "build_app"]

log = structlog.get_logger("service.http")

GATEWAY = web.AppKey("gateway", Gateway)
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


def answer(http_status: int, /, **body: Any) -> web.Response:
    return web.json_response(body, status=http_status, dumps=lambda o: json.dumps(o, default=str))


def error(http_status: int, code: str, message: str, **extra: Any) -> web.Response:
    return answer(http_status, status=code, error=message, **extra)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413, ...) and crashes as JSON; no traceback leaks."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return error(413, "too_large", "body larger than the configured limit")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error(500, "internal_error", "internal error; see the instance's logs")


async def webhook(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    config = gw.config
    if gw.shutting_down:
        return error(503, "shutting_down", "instance is shutting down; retry on another")
    if not ip_allowed(request.remote, config.allowed_ips):
        return error(403, "forbidden", "source address not allowed")
    # Any content type: TradingView sends JSON as application/json or text/plain.
    body = await request.read()
    signature = request.headers.get(SIGNATURE_HEADER)
    signed = signature is not None and signature_ok(body, signature, config.webhook_secret)
    if signature is not None and not signed:
        return error(401, "unauthorized", "bad signature")
    try:
        parsed = parse_body(
            body,
            now=datetime.now(UTC),
            max_future_skew=config.max_future_skew,
            instruments=config.instruments,
        )
    except SignalError as exc:
        if not signed and not body_secret_ok(body, config.webhook_secret):
            return error(401, "unauthorized", "missing or wrong secret")
        return answer(400, **exc.to_dict())
    if not signed and not secret_ok(parsed.secret, config.webhook_secret):
        return error(401, "unauthorized", "missing or wrong secret")
    status, result = await gw.accept(parsed.signal, fingerprint(parsed.signal), body)
    gw.responses[result["status"]] = gw.responses.get(result["status"], 0) + 1
    return answer(status, **result)


async def health(request: web.Request) -> web.Response:
    return answer(200, status="ok", instance_id=request.app[GATEWAY].config.instance_id)


async def ready(request: web.Request) -> web.Response:
    ok, reason = await request.app[GATEWAY].readiness()
    return answer(200 if ok else 503, status=reason)


async def leader(request: web.Request) -> web.Response:
    return answer(200, status="ok", **await request.app[GATEWAY].leader_view())


async def signal_by_id(request: web.Request) -> web.Response:
    raw = request.match_info["signal_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        return error(400, "invalid", "signal id must be a positive integer", field="signal_id")
    try:
        async with request.app[GATEWAY].pool.connection(timeout=1.0) as conn:
            found = await get_signal(conn, int(raw))
    except (psycopg.OperationalError, PoolTimeout):
        return error(503, "database_unreachable", "database unreachable; retry")
    if found is None:
        return error(404, "not_found", f"no signal {raw}")
    return answer(200, **found)


async def resign(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    if not gw.config.admin_token:
        return error(403, "forbidden", "admin endpoints are disabled (set PGLEADER_ADMIN_TOKEN)")
    if not admin_ok(request.headers.get("Authorization"), gw.config.admin_token):
        return error(401, "unauthorized", "missing or wrong admin token")
    epoch = gw.elector.epoch
    if not await gw.elector.resign("admin request", timeout=gw.config.timings.lease):
        return error(409, "not_leader", "this instance does not lead")
    return answer(200, status="resigned", epoch=epoch)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    view = await gw.leader_view()
    m = view["metrics"]
    hist = gw.inbox.write_seconds
    lines = [
        "# TYPE pgleader_is_leader gauge",
        f"pgleader_is_leader {int(view['is_leader'])}",
        "# TYPE pgleader_epoch gauge",
        f"pgleader_epoch {view['epoch'] or 0}",
        "# TYPE pgleader_heartbeats_total counter",
        f'pgleader_heartbeats_total{{result="ok"}} {m["heartbeats_ok"]}',
        f'pgleader_heartbeats_total{{result="failed"}} {m["heartbeats_failed"]}',
        "# TYPE pgleader_leadership_changes_total counter",
        f"pgleader_leadership_changes_total {m['leadership_changes']}",
        "# TYPE gateway_spooled_signals gauge",
        f"gateway_spooled_signals {m['spooled']}",
        "# TYPE gateway_webhook_answers_total counter",
        *(
            f'gateway_webhook_answers_total{{status="{k}"}} {v}'
            for k, v in sorted(gw.responses.items())
        ),
        "# TYPE gateway_executions_total counter",
        *(
            f'gateway_executions_total{{result="{k}"}} {v}'
            for k, v in sorted(m["executions"].items())
        ),
        # Batches and writes with the signals in them: their ratio is the mean size.
        "# TYPE gateway_execution_batches_total counter",
        f"gateway_execution_batches_total {m['execution_batches']['batches']}",
        "# TYPE gateway_execution_batch_signals_total counter",
        f"gateway_execution_batch_signals_total {m['execution_batches']['signals']}",
        "# TYPE gateway_inbox_writes_total counter",
        f"gateway_inbox_writes_total {m['inbox_writes']['writes']}",
        "# TYPE gateway_inbox_write_signals_total counter",
        f"gateway_inbox_write_signals_total {m['inbox_writes']['signals']}",
        # Time to commit a write: mostly the disk's WAL flush, which every answer waits for.
        "# TYPE gateway_inbox_write_seconds histogram",
        *(
            f'gateway_inbox_write_seconds_bucket{{le="{_le(bound)}"}} {n}'
            for bound, n in hist.cumulative()
        ),
        f"gateway_inbox_write_seconds_sum {hist.sum:.6f}",
        f"gateway_inbox_write_seconds_count {hist.count}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"


@functools.cache
def _openapi_document() -> bytes:
    return OPENAPI_PATH.read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """This HTTP surface described for clients and tools (tests/test_openapi.py keeps it true)."""
    return web.Response(body=_openapi_document(), content_type="application/yaml", charset="utf-8")


def build_app(gateway: Gateway) -> web.Application:
    app = web.Application(client_max_size=gateway.config.max_body_bytes, middlewares=[json_errors])
    app[GATEWAY] = gateway
    app.router.add_post("/webhook", webhook)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/coordinator/leader", leader)
    app.router.add_post("/coordinator/resign", resign)
    app.router.add_get("/signals/{signal_id}", signal_by_id)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.yaml", openapi)
    return app
