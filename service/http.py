"""The HTTP surface, on two listeners.

The public one (`build_public_app`) serves what TradingView and a load balancer
need: POST /webhook, /health, /ready; everything else answers 404 there, and the
source allow-list applies to all of it. The operator's (`build_operator_app`,
bound to 127.0.0.1 by default) serves the rest: /signals, /coordinator/*,
/metrics, /openapi.yaml behind an optional read token (and /health, /ready
without); every action also needs the admin token.

Every answer is JSON with a `status`; errors add `error` (and `field` for a bad
signal). Nothing is stored unless the body is valid and authenticated. Refusals
(4xx) are counted by listener, code and reason, and logged sampled.
"""

from __future__ import annotations

import asyncio
import functools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from aiohttp import http_exceptions, web
from aiohttp.typedefs import Handler, Middleware
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
from service.listener import protocol_error, read_body
from service.signals import SignalError, fingerprint, parse_body

__all__ = [
    "GATEWAY",
    "OPERATOR_COOKIE",
    "PUBLIC_PATHS",
    "build_operator_app",
    "build_public_app",
]

log = structlog.get_logger("service.http")

GATEWAY = web.AppKey("gateway", Gateway)
LISTENER = web.AppKey("listener", str)
PUBLIC_PATHS = frozenset({"/webhook", "/health", "/ready"})
# A browser's EventSource cannot send headers: the read token may come as this cookie.
OPERATOR_COOKIE = "pgleader_operator_token"
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")


def answer(http_status: int, /, **body: Any) -> web.Response:
    return web.json_response(body, status=http_status, dumps=lambda o: json.dumps(o, default=str))


def error(
    http_status: int, code: str, message: str, *, reason: str | None = None, **extra: Any
) -> web.Response:
    """An error answer; `reason` (default: `code`) is what the refusal is counted as."""
    response = answer(http_status, status=code, error=message, **extra)
    response["reason"] = reason or code
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (404, 405, 413, ...) and crashes as JSON; no traceback leaks.
    Every 4xx is counted (and logged, sampled) as a rejection."""
    try:
        response = await handler(request)
    except web.HTTPRequestEntityTooLarge:
        response = error(413, "too_large", "body larger than the configured limit")
        response.force_close()  # never read the rest of a body we refuse
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
    except web.RequestPayloadError as exc:  # e.g. a body that is not in its Content-Encoding
        reason, message = protocol_error(exc.__cause__)
        response = error(400, reason, message)
        response.force_close()
    except http_exceptions.HttpProcessingError as exc:
        reason, message = protocol_error(exc)
        response = error(400, reason, message)
        response.force_close()
    except (ConnectionError, asyncio.IncompleteReadError):
        # The client went away mid-request: nobody is left to answer; not our error.
        response = error(400, "client_disconnected", "the client closed the connection")
    except Exception:
        log.exception("unhandled error", path=request.path)
        response = error(500, "internal_error", "internal error; see the instance's logs")
    if 400 <= response.status < 500:
        gw = request.app[GATEWAY]
        reason = response.get("reason") or str(response.status)
        gw.rejections.record(request.app[LISTENER], response.status, reason, request.remote)
    return response


@web.middleware
async def whole_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the whole body within the deadline before any handler sees the request
    (after the allow-list and token checks: a stranger's body is never read)."""
    if request.body_exists:
        body = await read_body(request, request.app[GATEWAY].limits)
        if body is None:
            response = error(408, "request_timeout", "the request body did not arrive in time")
            response.force_close()
            return response
    return await handler(request)


def _allow_list(gateway: Gateway) -> Middleware:
    @web.middleware
    async def allowed(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not ip_allowed(request.remote, gateway.config.allowed_ips):
            return error(403, "forbidden", "source address not allowed", reason="address")
        return await handler(request)

    return allowed


def _read_token(gateway: Gateway) -> Middleware:
    """The operator's optional read token: Bearer header or cookie; the admin token also
    reads. /health and /ready stay open: probes carry no token, and they tell nothing."""

    @web.middleware
    async def token(request: web.Request, handler: Handler) -> web.StreamResponse:
        config = gateway.config
        if config.operator_token and request.path not in ("/health", "/ready"):
            bearer = request.headers.get("Authorization")
            cookie = request.cookies.get(OPERATOR_COOKIE)
            if not (
                admin_ok(bearer, config.operator_token)
                or admin_ok(bearer, config.admin_token)
                or secret_ok(cookie, config.operator_token)
            ):
                return error(
                    401, "unauthorized", "operator token required (Authorization: Bearer"
                    f" or cookie {OPERATOR_COOKIE})", reason="operator_token",
                )  # fmt: skip
        return await handler(request)

    return token


async def webhook(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    config = gw.config
    if gw.shutting_down:
        return error(503, "shutting_down", "instance is shutting down; retry on another")
    # Any content type: TradingView sends JSON as application/json or text/plain.
    body = await request.read()  # read already, within the deadline (json_errors)
    signature = request.headers.get(SIGNATURE_HEADER)
    signed = signature is not None and signature_ok(body, signature, config.webhook_secret)
    if signature is not None and not signed:
        return error(401, "unauthorized", "bad signature", reason="signature")
    try:
        parsed = parse_body(
            body,
            now=datetime.now(UTC),
            max_future_skew=config.max_future_skew,
            instruments=config.instruments,
        )
    except SignalError as exc:
        if not signed and not body_secret_ok(body, config.webhook_secret):
            return error(401, "unauthorized", "missing or wrong secret", reason="secret")
        response = answer(400, **exc.to_dict())
        response["reason"] = f"invalid_{exc.field or 'body'}"
        return response
    if not signed and not secret_ok(parsed.secret, config.webhook_secret):
        return error(401, "unauthorized", "missing or wrong secret", reason="secret")
    status, result = await gw.accept(parsed.signal, fingerprint(parsed.signal))
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
        return error(401, "unauthorized", "missing or wrong admin token", reason="admin_token")
    epoch = gw.elector.epoch
    if not await gw.elector.resign("admin request", timeout=gw.config.timings.lease):
        return error(409, "not_leader", "this instance does not lead")
    return answer(200, status="resigned", epoch=epoch)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    view = await gw.leader_view()
    m = view["metrics"]
    hist = gw.inbox.write_seconds
    spool = gw.spool.stats()
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
        # The outage spool: what waits for the database, and what it could not take.
        "# TYPE gateway_spooled_signals gauge",
        f"gateway_spooled_signals {spool['records']}",
        "# TYPE gateway_spool_bytes gauge",
        f"gateway_spool_bytes {spool['bytes']}",
        "# TYPE gateway_spool_max_bytes gauge",
        f"gateway_spool_max_bytes {spool['max_bytes']}",
        "# TYPE gateway_spool_refused_total counter",
        f"gateway_spool_refused_total {spool['refused']}",
        "# TYPE gateway_spool_quarantined_total counter",
        f"gateway_spool_quarantined_total {spool['quarantined']}",
        # Requests refused (4xx, 503 busy) by listener, code and reason: an attack shows here.
        "# TYPE gateway_http_rejections_total counter",
        *(
            f'gateway_http_rejections_total{{listener="{listener}",code="{code}",'
            f'reason="{reason}"}} {n}'
            for (listener, code, reason), n in sorted(gw.rejections.counts.items())
        ),
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


def _app(gateway: Gateway, listener: str, *guards: Middleware) -> web.Application:
    app = web.Application(
        client_max_size=gateway.config.max_body_bytes,
        middlewares=[json_errors, *guards, whole_body],
    )
    app[GATEWAY] = gateway
    app[LISTENER] = listener
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


def build_public_app(gateway: Gateway) -> web.Application:
    """What the internet may reach: the webhook, and a load balancer's checks."""
    app = _app(gateway, "public", _allow_list(gateway))
    app.router.add_post("/webhook", webhook)
    return app


def build_operator_app(gateway: Gateway) -> web.Application:
    """What the operator reads and does: never exposed beside the webhook."""
    app = _app(gateway, "operator", _read_token(gateway))
    app.router.add_get("/coordinator/leader", leader)
    app.router.add_post("/coordinator/resign", resign)
    app.router.add_get("/signals/{signal_id}", signal_by_id)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.yaml", openapi)
    return app
