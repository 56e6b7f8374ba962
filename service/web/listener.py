"""Listening sockets and the guard on every connection they accept.

An instance may face the internet (TradingView posts only to ports 80 and 443),
so nothing a client sends before it has authenticated may hold memory or a
connection for long:
  - a request's head must arrive within `request_timeout` of the connection
    opening or of the previous answer (aiohttp's keep-alive timer closes an
    idle or half-sent connection; it is set to that deadline), its body within
    `request_timeout` too (`read_body`);
  - header count and sizes are capped at what a webhook needs;
  - at most `max_connections` connections at once per listener; one more is
    answered 503 and closed at once (TradingView retries 5xx).
aiohttp's own protocol errors (a bad method, an oversized header, conflicting
Content-Length and Transfer-Encoding, ...) answer JSON like every other error,
without echoing the input, and are counted and logged as rejections, not as
crashes: a flood of them must not look like an outage.

Sockets are bound before anything else starts (`bind`), so a port in use
fails the start in one line instead of after joining the election.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from pgleader.errors import ConfigError

__all__ = [
    "GuardedSite",
    "Limits",
    "Rejections",
    "bind",
    "protocol_error",
    "read_body",
    "runner",
]

log = structlog.get_logger("service.web.routes")


# aiohttp's parser errors, by what the client did wrong. Fixed messages: never echo input.
_PROTOCOL_ERRORS: list[tuple[type[Exception], str, str]] = [
    (http_exceptions.BadHttpMethod, "bad_method", "unsupported HTTP method"),
    (http_exceptions.LineTooLong, "header_too_long", "request line or header too long"),
    (http_exceptions.TransferEncodingError, "bad_transfer_encoding", "bad Transfer-Encoding"),
    (http_exceptions.ContentEncodingError, "bad_content_encoding", "unsupported Content-Encoding"),
    (http_exceptions.ContentLengthError, "bad_content_length", "bad Content-Length"),
    (http_exceptions.InvalidHeader, "bad_header", "malformed header"),
    (http_exceptions.BadStatusLine, "bad_request_line", "malformed request line"),
    (http_exceptions.InvalidURLError, "bad_url", "malformed URL"),
]


def protocol_error(exc: BaseException | None) -> tuple[str, str]:
    """(reason, message) for an HTTP parsing error."""
    for kind, reason, message in _PROTOCOL_ERRORS:
        if isinstance(exc, kind):
            return reason, message
    if isinstance(exc, http_exceptions.BadHttpMessage) and "header" in str(exc).lower():
        return "bad_header", "malformed or too many headers"
    return "bad_request", "malformed HTTP request"


_CLIENT_FAULTS = (web.RequestPayloadError, http_exceptions.HttpProcessingError, ConnectionError)


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int
    request_timeout: float
    max_body_bytes: int


@dataclass
class Rejections:
    """Requests refused before or at authentication, counted by listener, code and
    reason; logged at most once per reason every `every` seconds, with how many
    were not logged in between. Never logs a secret, a header or a body."""

    every: float = 10.0
    counts: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    _last: dict[tuple[str, int, str], float] = field(default_factory=dict)
    _quiet: Counter[tuple[str, int, str]] = field(default_factory=Counter)

    def record(self, listener: str, code: int, reason: str, remote: str | None) -> None:
        key = (listener, code, reason)
        self.counts[key] += 1
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            self._quiet[key] += 1
            return
        self._last[key] = now
        log.warning(
            "request rejected", listener=listener, code=code, reason=reason, remote=remote,
            not_logged_since=self._quiet.pop(key, 0),
        )  # fmt: skip


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket, or a ConfigError naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port} ({what}): {reason}") from None
    sock.setblocking(False)
    return sock


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering its own protocol errors in JSON."""

    __slots__ = ("_broken", "_guard")

    def __init__(self, manager: web.Server, guard: GuardedSite, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._broken = False

    def data_received(self, data: bytes) -> None:
        # After a parse error the parser fails again on every later chunk, each
        # failure queued with a copy of the offending line: 400 clients sending
        # 1 MB heads took 425 MB that way. The answer is on its way; drop the rest.
        if self._broken:
            return
        super().data_received(data)
        self._broken = any(isinstance(message, _ErrInfo) for message, _ in self._messages)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # A client that breaks off mid-body or sends an undecodable one, seen again
        # while aiohttp drains what is left of it: the client's fault, already answered.
        if isinstance(kw.get("exc_info"), _CLIENT_FAULTS):
            self.log_debug(*args, **kw)
        else:
            super().log_exception(*args, **kw)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a crash outside our handlers: keep aiohttp's log of it
            self.log_exception("Error handling request", exc_info=exc)
            reason, text = "internal_error", "internal error; see the instance's logs"
        else:
            reason, text = protocol_error(exc)
            self._guard.rejections.record(self._guard.listener, status, reason, request.remote)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the error")
        body = {"status": reason, "error": text}
        response = web.json_response(body, status=status, reason=HTTPStatus(status).phrase)
        response.force_close()
        return response


class _Busy(asyncio.Protocol):
    """A connection over the cap: one 503 answer, then closed. What the client sent
    is read and dropped until it closes (at most a second): closing with unread
    input would reset the connection and lose the answer."""

    _ANSWER = (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nRetry-After: 1\r\nContent-Length: 71\r\n\r\n"
        b'{"status": "busy", "error": "too many connections; retry in a moment"}'
    )

    def __init__(self, site: GuardedSite) -> None:
        self._site = site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) else None
        self._site.rejections.record(self._site.listener, 503, "too_many_connections", remote)
        transport.write(self._ANSWER)
        transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself


class GuardedSite(web.BaseSite):
    """A site on a socket bound beforehand, with the connection cap and the JSON
    protocol errors of this module."""

    __slots__ = ("_sock", "limits", "listener", "rejections")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        listener: str,
        limits: Limits,
        rejections: Rejections,
    ) -> None:
        super().__init__(runner)
        self._sock = sock
        self.listener = listener
        self.limits = limits
        self.rejections = rejections

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        kwargs = server._kwargs  # the runner's handler settings (timeouts, header limits)

        def connection() -> asyncio.Protocol:
            if len(server.connections) >= self.limits.max_connections:
                return _Busy(self)
            return _Handler(server, self, loop=loop, **kwargs)

        self._server = await loop.create_server(connection, sock=self._sock)


def runner(
    app: web.Application, *, request_timeout: float, shutdown_timeout: float
) -> web.AppRunner:
    """The runner of one listener's app, with this module's limits."""
    return web.AppRunner(
        app,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
        # The keep-alive timer doubles as the deadline for a request's head: it
        # closes a connection that sent nothing, or half a head, for that long.
        keepalive_timeout=request_timeout,
        # The rest of a body nobody will read (a refused one) is drained for at most
        # 2 s: closing with unread input would lose the answer.
        lingering_time=2.0,
        # A webhook needs a handful of short headers; a browser a few more.
        max_line_size=4096,
        max_field_size=4096,
        max_headers=32,
    )


async def read_body(request: web.Request, limits: Limits) -> bytes | None:
    """The whole body within the deadline, or None when it did not arrive in time.
    Raises HTTPRequestEntityTooLarge as soon as the declared length is over the cap."""
    length = request.content_length
    if length is not None and length > limits.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=limits.max_body_bytes, actual_size=length)
    try:
        async with asyncio.timeout(limits.request_timeout):
            return await request.read()
    except TimeoutError:
        return None
