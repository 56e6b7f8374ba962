"""Where alerts go: Telegram's Bot API, a Slack-compatible incoming webhook, a JSON webhook.

A sink sends one message and says how it went (`Sent`); it never raises, so the
delivery loop (service/alerts/delivery.py) records every outcome:

- delivered: the sink took it (Telegram `{"ok": true}`, Slack `ok`, any 2xx);
- failed: it did not arrive (connection refused, a 5xx): retried with backoff;
- unknown: no answer (a timeout, a connection dropped mid-request): retried, and
  the next send says it is a repeat;
- rate_limited: a 429, with the seconds to wait (Telegram's
  `parameters.retry_after`, else the `Retry-After` header);
- refused: any other 4xx (a bad token, an unknown chat, a removed webhook): the
  same message would be refused again, so it is given up after a few.

Secrets: Telegram's token is part of its URL, a webhook's URL is its credential,
and an HTTP client's error text quotes the URL. So a `Sent.detail` is never an
exception's text: it is written here from the exception's type or the answer's
status (plus the answer's own short description), and every secret is cut out of
it all the same (`scrub`).
"""

from __future__ import annotations

import asyncio
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from service.config import SinkSettings

__all__ = ["Message", "Outcome", "Sent", "Sink", "build_sinks", "send_to_each"]

Outcome = Literal["delivered", "failed", "unknown", "rate_limited", "refused"]

# What a chat shows at most (Telegram takes 4096 characters, Slack advises 4000).
TEXT_LIMIT = 4000
_ANSWER_LIMIT = 64 * 1024  # bytes of an answer read: enough for any sink's JSON
_RETRY_AFTER_DEFAULT = 30.0
# Newer aiohttp tells these apart (older ones raise their base classes).
_DNS_ERROR: tuple[type[Exception], ...] = tuple(
    getattr(aiohttp, name) for name in ("ClientConnectorDNSError",) if hasattr(aiohttp, name)
)
_CONNECT_TIMEOUT: tuple[type[Exception], ...] = tuple(
    getattr(aiohttp, name) for name in ("ConnectionTimeoutError",) if hasattr(aiohttp, name)
)


@dataclass(frozen=True, slots=True)
class Message:
    """One message: `text` for the chats, `payload` for the JSON webhook."""

    text: str
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sent:
    outcome: Outcome
    detail: str = ""  # one line, no secret: "telegram: HTTP 400: Bad Request: chat not found"
    retry_after: float | None = None  # a 429's wait, seconds


class Sink(ABC):
    """One destination. `send` never raises and never returns a secret."""

    name: str

    def __init__(self, url: str, secrets: tuple[str, ...]) -> None:
        self._url = url
        self._secrets = tuple(s for s in secrets if s)

    async def send(self, session: aiohttp.ClientSession, message: Message) -> Sent:
        try:
            async with session.post(
                self._url, json=self._body(message), allow_redirects=False
            ) as resp:
                raw = await resp.content.read(_ANSWER_LIMIT)
                sent = self._answer(resp.status, resp.headers, raw)
        except Exception as exc:  # never its text: it may quote the URL
            sent = _failure(exc, session.timeout.total)
        return Sent(sent.outcome, self.scrub(f"{self.name}: {sent.detail}"), sent.retry_after)

    def scrub(self, text: str) -> str:
        """`text` without any of this sink's secrets (defence in depth: no text built
        here should hold one)."""
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return " ".join(text.split())[:500]

    @abstractmethod
    def _body(self, message: Message) -> dict[str, Any]: ...

    @abstractmethod
    def _answer(self, status: int, headers: Mapping[str, str], raw: bytes) -> Sent: ...


class Telegram(Sink):
    """POST {base}/bot{token}/sendMessage {"chat_id", "text"}: the Bot API."""

    name = "telegram"

    def __init__(self, base_url: str, token: str, chat_id: str) -> None:
        super().__init__(f"{base_url.rstrip('/')}/bot{token}/sendMessage", (token,))
        self.chat_id = chat_id

    def _body(self, message: Message) -> dict[str, Any]:
        return {
            "chat_id": self.chat_id,
            "text": message.text[:TEXT_LIMIT],
            "disable_web_page_preview": True,
        }

    def _answer(self, status: int, headers: Mapping[str, str], raw: bytes) -> Sent:
        data = _json_object(raw)
        description = str(data.get("description") or "")[:200]
        said = f"HTTP {status}" + (f": {description}" if description else "")
        if 200 <= status < 300 and data.get("ok") is True:
            result = data.get("result")
            number = result.get("message_id") if isinstance(result, dict) else None
            return Sent("delivered", f"message {number}" if number is not None else "ok")
        if status == 429:
            parameters = data.get("parameters")
            wait = parameters.get("retry_after") if isinstance(parameters, dict) else None
            return Sent("rate_limited", said, _retry_after(wait, headers))
        return _by_status(status, said)


class Slack(Sink):
    """POST {"text"} to an incoming webhook; `ok` in plain text when taken."""

    name = "slack"

    def __init__(self, url: str) -> None:
        super().__init__(url, _url_secrets(url))

    def _body(self, message: Message) -> dict[str, Any]:
        return {"text": message.text[:TEXT_LIMIT]}

    def _answer(self, status: int, headers: Mapping[str, str], raw: bytes) -> Sent:
        body = raw[:200].decode("utf-8", "replace").strip()
        said = f"HTTP {status}" + (f": {body}" if body and status != 200 else "")
        if 200 <= status < 300:
            return Sent("delivered", "ok")
        if status == 429:
            return Sent("rate_limited", said, _retry_after(None, headers))
        return _by_status(status, said)


class Webhook(Sink):
    """POST the event as a JSON object; any 2xx means taken."""

    name = "webhook"

    def __init__(self, url: str) -> None:
        super().__init__(url, _url_secrets(url))

    def _body(self, message: Message) -> dict[str, Any]:
        return message.payload

    def _answer(self, status: int, headers: Mapping[str, str], raw: bytes) -> Sent:
        body = raw[:100].decode("utf-8", "replace").strip()
        said = f"HTTP {status}" + (f": {body}" if body and not 200 <= status < 300 else "")
        if 200 <= status < 300:
            return Sent("delivered", f"HTTP {status}")
        if status == 429:
            return Sent("rate_limited", said, _retry_after(None, headers))
        return _by_status(status, said)


def build_sinks(settings: SinkSettings) -> list[Sink]:
    """The sinks the settings configure, in a fixed order."""
    sinks: list[Sink] = []
    if settings.telegram_token:
        sinks.append(
            Telegram(settings.telegram_url, settings.telegram_token, settings.telegram_chat_id)
        )
    if settings.slack_webhook_url:
        sinks.append(Slack(settings.slack_webhook_url))
    if settings.alert_webhook_url:
        sinks.append(Webhook(settings.alert_webhook_url))
    return sinks


async def send_to_each(sinks: Sequence[Sink], message: Message, timeout: float) -> list[Sent]:
    """One message to every sink at once, straight (no database, no retry): what each
    said, in the sinks' order. `pgleader sinks test` and an instance's outage alarm."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        return list(await asyncio.gather(*(sink.send(session, message) for sink in sinks)))


# -- answers and failures ------------------------------------------------------------


def _by_status(status: int, said: str) -> Sent:
    if 500 <= status < 600:
        return Sent("failed", said)
    if 300 <= status < 400:
        return Sent("refused", f"{said} (a redirect: not followed)")
    if 400 <= status < 500:
        return Sent("refused", said)
    return Sent("failed", f"{said} (unexpected answer)")


def _failure(exc: BaseException, timeout: float | None) -> Sent:
    """What an exception of the HTTP client means, in words of our own."""
    if isinstance(exc, _CONNECT_TIMEOUT):  # nothing was sent
        within = f" within {timeout:g} s" if timeout else ""
        return Sent("failed", f"no connection{within}")
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g} s" if timeout else ""
        return Sent("unknown", f"no answer{within}")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return Sent("failed", "TLS handshake failed")
    if isinstance(exc, _DNS_ERROR):
        return Sent("failed", "host name not resolved")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return Sent("failed", "connection refused")
        return Sent("failed", "cannot connect")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Sent("unknown", "connection closed without an answer")
    if isinstance(exc, aiohttp.InvalidURL):
        return Sent("refused", "invalid URL")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return Sent("unknown", "unreadable answer")
    if isinstance(exc, aiohttp.ClientOSError):
        return Sent("unknown", "connection broken")
    return Sent("unknown", f"error ({type(exc).__name__})")


def _retry_after(given: Any, headers: Mapping[str, str]) -> float:
    """Seconds a 429 asks for: the body's figure, else the Retry-After header's,
    within 1 s and an hour (30 s when neither is a number)."""
    values: tuple[Any, ...] = (given, headers.get("Retry-After"))
    for value in values:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(seconds):
            return min(3600.0, max(1.0, seconds))
    return _RETRY_AFTER_DEFAULT


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _url_secrets(url: str) -> tuple[str, ...]:
    """A webhook URL is a credential as a whole, and so are its path and query."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return (url,)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return (url, tail) if len(tail) > 1 else (url,)
