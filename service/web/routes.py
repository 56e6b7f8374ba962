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
import base64
import functools
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import http_exceptions, web
from aiohttp.typedefs import Handler, Middleware

from pgleader.errors import DatabaseUnavailable, NotLeader, TransferRefused
from service.config import ServiceConfig
from service.errors import DATABASE_UNAVAILABLE, SignalError
from service.intake.signals import Signal, fingerprint, parse_body
from service.web.auth import (
    SIGNATURE_HEADER,
    admin_ok,
    body_secret_ok,
    ip_allowed,
    secret_ok,
    signature_ok,
)
from service.web.listener import Limits, Rejections, protocol_error, read_body
from service.web.metrics import Metrics

__all__ = [
    "GATEWAY",
    "OPERATOR_COOKIE",
    "PUBLIC_PATHS",
    "build_operator_app",
    "build_public_app",
]

log = structlog.get_logger("service.web.routes")


class StatusSource(Protocol):
    """The status page's feed (service.status.StatusFeed)."""

    async def snapshot(self) -> str: ...
    def subscribe(self) -> asyncio.Queue[str | None]: ...
    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None: ...


class Surface(Protocol):
    """What the HTTP layer needs of a gateway instance (service.gateway.Gateway)."""

    config: ServiceConfig
    shutting_down: bool
    responses: dict[str, int]

    @property
    def status(self) -> StatusSource: ...

    async def accept(self, signal: Signal, fp: str) -> tuple[int, dict[str, Any]]: ...
    def refused(self, error: SignalError, body: bytes) -> None: ...
    async def readiness(self) -> tuple[bool, str]: ...
    async def leader_view(self) -> dict[str, Any]: ...
    def stats(self) -> dict[str, Any]: ...
    async def find_signal(self, signal_id: int) -> dict[str, Any] | None: ...
    async def resign(self, reason: str) -> int | None: ...
    async def transfer(self, to: str) -> int: ...
    async def trading_halt(self) -> dict[str, Any]: ...
    async def set_trading_halt(self, mode: str, reason: str | None, by: str) -> dict[str, Any]: ...
    async def reconcile_now(self, trigger: str, timeout: float) -> dict[str, Any]: ...
    async def job_list(self) -> list[dict[str, Any]]: ...
    async def run_job(self, name: str, timeout: float) -> dict[str, Any] | None: ...
    async def statistics(self) -> dict[str, Any]: ...


GATEWAY = web.AppKey("gateway", Surface)
LISTENER = web.AppKey("listener", str)
LIMITS = web.AppKey("limits", Limits)
REJECTIONS = web.AppKey("rejections", Rejections)
METRICS = web.AppKey("metrics", Metrics)
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
        reason = response.get("reason") or str(response.status)
        request.app[REJECTIONS].record(
            request.app[LISTENER], response.status, reason, request.remote
        )
    return response


@web.middleware
async def whole_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the whole body within the deadline before any handler sees the request
    (after the allow-list and token checks: a stranger's body is never read)."""
    if request.body_exists:
        body = await read_body(request, request.app[LIMITS])
        if body is None:
            response = error(408, "request_timeout", "the request body did not arrive in time")
            response.force_close()
            return response
    return await handler(request)


def _allow_list(gateway: Surface) -> Middleware:
    @web.middleware
    async def allowed(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not ip_allowed(request.remote, gateway.config.allowed_ips):
            return error(403, "forbidden", "source address not allowed", reason="address")
        return await handler(request)

    return allowed


def _read_token(gateway: Surface) -> Middleware:
    """The operator's optional read token: Bearer header or cookie; the admin token also
    reads. /health and /ready stay open: probes carry no token, and they tell nothing."""

    @web.middleware
    async def token(request: web.Request, handler: Handler) -> web.StreamResponse:
        config = gateway.config
        if config.operator_token and request.path not in ("/health", "/ready"):
            given = request.query.get("token")
            if request.path in ("/", "/status") and given is not None:
                return _sign_in(given, config.operator_token)
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


def _sign_in(given: str, operator_token: str) -> web.Response:
    """`/status?token=...` once: a browser gets the read token as a cookie (HttpOnly,
    this site only) and goes to /status without the token in its address bar."""
    if not secret_ok(given, operator_token):
        return error(401, "unauthorized", "wrong operator token", reason="operator_token")
    response = web.Response(
        status=303, headers={"Location": "/status", "Cache-Control": "no-store"}
    )
    response.set_cookie(OPERATOR_COOKIE, given, httponly=True, samesite="Strict", path="/")
    return response


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
            instruments=config.accepted_instruments,
        )
    except SignalError as exc:
        if not signed and not body_secret_ok(body, config.webhook_secret):
            return error(401, "unauthorized", "missing or wrong secret", reason="secret")
        gw.refused(exc, body)  # the sender is ours and TradingView will not retry: alerted
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
        found = await request.app[GATEWAY].find_signal(int(raw))
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; retry")
    if found is None:
        return error(404, "not_found", f"no signal {raw}")
    return answer(200, **found)


def _admin_refusal(request: web.Request) -> web.Response | None:
    gw = request.app[GATEWAY]
    if not gw.config.admin_token:
        return error(403, "forbidden", "admin endpoints are disabled (set PGLEADER_ADMIN_TOKEN)")
    if not admin_ok(request.headers.get("Authorization"), gw.config.admin_token):
        return error(401, "unauthorized", "missing or wrong admin token", reason="admin_token")
    return None


async def resign(request: web.Request) -> web.Response:
    if (refused := _admin_refusal(request)) is not None:
        return refused
    gw = request.app[GATEWAY]
    epoch = await gw.resign("admin request")
    if epoch is None:
        return error(409, "not_leader", "this instance does not lead")
    return answer(200, status="resigned", epoch=epoch)


async def transfer(request: web.Request) -> web.Response:
    """Hand leadership to the instance named in {"to": ID}: this leader ends its
    executions under way, names it, resigns; refused with the reason (409) when the
    target is unknown, not alive or may not lead, or when this instance does not lead."""
    if (refused := _admin_refusal(request)) is not None:
        return refused
    data = await _json_object(request)
    if isinstance(data, web.Response):
        return data
    if unknown := set(data) - {"to"}:
        name = sorted(unknown)[0]
        return error(400, "invalid", f"unknown field {name}: to", field=name)
    to = data.get("to")
    if not isinstance(to, str) or not to or len(to) > 200 or not to.isprintable():
        return error(400, "invalid", "to must name an instance (1 to 200 characters)",
                     field="to")  # fmt: skip
    gw = request.app[GATEWAY]
    try:
        epoch = await gw.transfer(to)
    except NotLeader:
        return error(409, "not_leader", "this instance does not lead")
    except TransferRefused as exc:
        return error(409, "refused", str(exc))
    except (*DATABASE_UNAVAILABLE, DatabaseUnavailable):
        return error(503, "database_unreachable", "database unreachable; retry")
    except TimeoutError:
        return error(503, "timeout", "the hand-over did not end in time; see the leader's logs")
    return answer(200, status="transferred", epoch=epoch, to=to)


async def _json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """An admin request's optional JSON object body ({} when empty)."""
    body = await request.read()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return error(400, "invalid", "body must be a JSON object")
    if not isinstance(data, dict):
        return error(400, "invalid", "body must be a JSON object")
    return data


async def halt(request: web.Request) -> web.Response:
    """Stop trading: nothing is sent ({"entries_only": true}: exits still are)."""
    if (refused := _admin_refusal(request)) is not None:
        return refused
    data = await _json_object(request)
    if isinstance(data, web.Response):
        return data
    reason, entries_only = data.get("reason"), data.get("entries_only", False)
    if unknown := set(data) - {"reason", "entries_only"}:
        name = sorted(unknown)[0]
        return error(400, "invalid", f"unknown field {name}: reason, entries_only", field=name)
    if reason is not None and (not isinstance(reason, str) or not reason.isprintable()
                               or len(reason) > 500):  # fmt: skip
        return error(400, "invalid", "reason must be a line of text (500 characters at most)",
                     field="reason")  # fmt: skip
    if not isinstance(entries_only, bool):
        return error(400, "invalid", "entries_only must be true or false", field="entries_only")
    mode = "entries_only" if entries_only else "halted"
    return await _set_halt(request, mode, reason)


async def resume(request: web.Request) -> web.Response:
    if (refused := _admin_refusal(request)) is not None:
        return refused
    return await _set_halt(request, "running", None)


async def _set_halt(request: web.Request, mode: str, reason: str | None) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        state = await gw.set_trading_halt(mode, reason, f"admin via {gw.config.instance_id}")
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; nothing changed, retry")
    if state["mode"] == "rewound" and mode != "rewound":
        return error(
            409, "database_rewound", "nothing changed: trading stays halted because the"
            " database went back in time; reconcile with the broker, then run"
            " `pgleader resume --after-rewind`",
        )  # fmt: skip
    return answer(200, status=state["mode"], **{k: v for k, v in state.items() if k != "mode"})


async def reconcile(request: web.Request) -> web.Response:
    """Compare the ledger with the broker now (the leader runs it); its result."""
    if (refused := _admin_refusal(request)) is not None:
        return refused
    gw = request.app[GATEWAY]
    try:
        run = await gw.reconcile_now("admin", timeout=10.0)
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; retry")
    if run["outcome"] is None:
        return answer(202, status="requested", **run)
    return answer(200, status=run["outcome"], **run)


async def jobs(request: web.Request) -> web.Response:
    """The leader's periodic jobs: schedule, next run, last outcome."""
    try:
        found = await request.app[GATEWAY].job_list()
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; retry")
    return answer(200, jobs=found)


async def run_job(request: web.Request) -> web.Response:
    """Run a job of the leader now; its outcome when it ends within 10 s."""
    if (refused := _admin_refusal(request)) is not None:
        return refused
    gw, name = request.app[GATEWAY], request.match_info["name"]
    try:
        run = await gw.run_job(name, timeout=10.0)
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; nothing asked, retry")
    if run is None:
        known = ", ".join(j["job"] for j in await gw.job_list()) or "none registered yet"
        return error(404, "unknown_job", f"no job {name!r} (known: {known})", field="name")
    if run["outcome"] is None:
        return answer(202, status="requested", **run)
    return answer(200, status=run["outcome"], **run)


async def statistics(request: web.Request) -> web.Response:
    """The leader's statistics, as its `statistics` job last made them."""
    try:
        found = await request.app[GATEWAY].statistics()
    except DATABASE_UNAVAILABLE:
        return error(503, "database_unreachable", "database unreachable; retry")
    return answer(200, **found)


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus' text format (service/web/metrics.py); memory only, never a query."""
    found = request.app[METRICS]
    return web.Response(body=found.render(), headers={"Content-Type": found.content_type})


# --- the status page ------------------------------------------------------------------

STATUS_PAGE_PATH = Path(__file__).with_name("status.html")
# Pings on a quiet stream: proxies and browsers keep it open, a dead client is noticed.
_KEEPALIVE_S = 15.0


@functools.cache
def _status_page() -> tuple[bytes, str]:
    """The page, and its Content-Security-Policy: nothing but itself (its one inline
    script and style by their hashes, the event stream from this origin)."""
    body = STATUS_PAGE_PATH.read_bytes()
    text = body.decode()
    script = text.split("<script>", 1)[1].split("</script>", 1)[0]
    style = text.split("<style>", 1)[1].split("</style>", 1)[0]
    policy = (
        f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}';"
        " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )
    return body, policy


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


async def status_page(request: web.Request) -> web.Response:
    """The live status page: read-only HTML; its data comes from /status/events."""
    body, policy = _status_page()
    return web.Response(body=body, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": policy, "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    })  # fmt: skip


async def status_snapshot(request: web.Request) -> web.Response:
    """What the page shows, once, as JSON (for scripts)."""
    text = await request.app[GATEWAY].status.snapshot()
    return web.Response(text=text, content_type="application/json")


async def status_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: a `snapshot` event now and at every change (LISTEN-fed),
    until the client leaves or the instance shuts down."""
    feed = request.app[GATEWAY].status
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-store",
        "X-Accel-Buffering": "no",
    })  # fmt: skip
    await response.prepare(request)
    queue = feed.subscribe()
    try:
        await response.write(b"retry: 2000\n\n")  # the browser reconnects after 2 s
        text: str | None = await feed.snapshot()
        while text is not None:
            await response.write(f"event: snapshot\ndata: {text}\n\n".encode())
            while True:
                try:
                    async with asyncio.timeout(_KEEPALIVE_S):
                        text = await queue.get()
                    break
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
    except ConnectionResetError:
        pass  # the page went away
    finally:
        feed.unsubscribe(queue)
    return response


@functools.cache
def _openapi_document() -> bytes:
    return OPENAPI_PATH.read_bytes()


async def openapi(request: web.Request) -> web.Response:
    """This HTTP surface described for clients and tools (tests/test_openapi.py keeps it true)."""
    return web.Response(body=_openapi_document(), content_type="application/yaml", charset="utf-8")


def _app(
    gateway: Surface,
    listener: str,
    limits: Limits,
    rejections: Rejections,
    metrics: Metrics | None,
    *guards: Middleware,
) -> web.Application:
    metrics = metrics or Metrics(gateway, rejections)
    app = web.Application(
        client_max_size=limits.max_body_bytes,
        middlewares=[metrics.middleware(listener), json_errors, *guards, whole_body],
    )
    app[GATEWAY] = gateway
    app[LISTENER] = listener
    app[LIMITS] = limits
    app[REJECTIONS] = rejections
    app[METRICS] = metrics
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app


def build_public_app(
    gateway: Surface, limits: Limits, rejections: Rejections, metrics: Metrics | None = None
) -> web.Application:
    """What the internet may reach: the webhook, and a load balancer's checks.
    `metrics`: the process's (one for both listeners); None: an app of its own."""
    app = _app(gateway, "public", limits, rejections, metrics, _allow_list(gateway))
    app.router.add_post("/webhook", webhook)
    return app


def build_operator_app(
    gateway: Surface, limits: Limits, rejections: Rejections, metrics: Metrics | None = None
) -> web.Application:
    """What the operator reads and does: never exposed beside the webhook."""
    app = _app(gateway, "operator", limits, rejections, metrics, _read_token(gateway))
    app.router.add_get("/coordinator/leader", leader)
    app.router.add_post("/coordinator/resign", resign)
    app.router.add_post("/coordinator/transfer", transfer)
    app.router.add_post("/admin/halt", halt)
    app.router.add_post("/admin/resume", resume)
    app.router.add_post("/admin/reconcile", reconcile)
    app.router.add_post("/admin/jobs/{name}/run", run_job)
    app.router.add_get("/jobs", jobs)
    app.router.add_get("/statistics", statistics)
    app.router.add_get("/signals/{signal_id}", signal_by_id)
    app.router.add_get("/metrics", prometheus_metrics)
    app.router.add_get("/openapi.yaml", openapi)
    app.router.add_get("/", status_page)
    app.router.add_get("/status", status_page)
    app.router.add_get("/status/snapshot", status_snapshot)
    app.router.add_get("/status/events", status_events)
    return app
