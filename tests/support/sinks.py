"""A receiver of alerts over real HTTP, shaped like Telegram's Bot API, a Slack incoming
webhook and a generic JSON webhook: what the alert delivery (service/alerts/) meets.

In process: `receiver = SinkReceiver()`, `await receiver.start()`, `receiver.env()`
(the PGLEADER_* settings that point a gateway at it), `receiver.fail(sink, *faults)`,
`receiver.texts(sink)`, `await receiver.close()`.

What it reproduces (core.telegram.org/bots/api, api.slack.com/messaging/webhooks):
- Telegram: `POST /bot<token>/sendMessage` with JSON `{"chat_id", "text"}`; success
  `{"ok": true, "result": {"message_id": N, "chat": {...}, "date": ..., "text": ...}}`;
  errors `{"ok": false, "error_code": 400|401|..., "description": "..."}` (401
  Unauthorized for a wrong token, 400 "Bad Request: chat not found", "message text
  is empty", "message is too long" beyond 4096 characters); a flood answers HTTP 429
  `{"ok": false, "error_code": 429, "description": "Too Many Requests: retry after N",
  "parameters": {"retry_after": N}}`.
- Slack: `POST` JSON `{"text"}` to the webhook's path; `200 ok` in text/plain; errors
  in text/plain: 400 `invalid_payload` / `no_text`, 403 `invalid_token`, 404
  `no_service`, 410 `channel_is_archived`, 500 `rollup_error`; a rate limit answers
  429 `rate_limited` with a `Retry-After: N` header.
- The JSON webhook: any JSON object, `200 {"ok": true}`; 429 with `Retry-After`.

Faults, per sink, taken in order by its next requests: `"429:N"` (rate limited, retry
after N s), `"500"`, `"401"`, `"403"`, `"400"`, `"404"`, `"410"` (those answers), and
`"hang"` (the request is held, unanswered, until `release()` or `close()`: its
message counts as maybe arrived, in `held`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["Received", "SinkReceiver"]

TOKEN = "7001234567:AAH-test-token-Zq8xWv3Ld9Kp2"
CHAT_ID = "-1001987654321"
SLACK_PATH = "/services/T0PGL/B0ALERT/slackSecretHook7f3"
HOOK_PATH = "/hooks/pgleader/webhookSecret9a1"
SINKS = ("telegram", "slack", "webhook")

_SLACK_ERRORS = {400: "invalid_payload", 401: "invalid_token", 403: "invalid_token",
                 404: "no_service", 410: "channel_is_archived", 500: "rollup_error"}  # fmt: skip
_TELEGRAM_ERRORS = {400: "Bad Request: chat not found", 401: "Unauthorized",
                    403: "Forbidden: bot was kicked from the supergroup chat",
                    404: "Not Found", 410: "Gone", 500: "Internal Server Error"}  # fmt: skip


@dataclass
class Received:
    """One message a sink took: its text (the chats) or its JSON (the webhook)."""

    sink: str
    text: str
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class SinkReceiver:
    def __init__(self, token: str = TOKEN, chat_id: str = CHAT_ID) -> None:
        self.token = token
        self.chat_id = chat_id
        self.url = ""
        self.received: dict[str, list[Received]] = {sink: [] for sink in SINKS}
        self.held: dict[str, list[Received]] = {sink: [] for sink in SINKS}
        self.requests: dict[str, list[float]] = {sink: [] for sink in SINKS}  # monotonic
        self.faults: dict[str, collections.deque[str]] = {s: collections.deque() for s in SINKS}
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._messages = 0

    # -- driving it

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/bot{token}/sendMessage", self._telegram)
        app.router.add_post("/services/{path:.*}", self._slack)
        app.router.add_post("/hooks/{path:.*}", self._webhook)
        self._runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let every held request go (answered as if nothing had happened)."""
        self._release.set()

    def fail(self, sink: str, *faults: str) -> None:
        self.faults[sink].extend(faults)

    @property
    def slack_url(self) -> str:
        return self.url + SLACK_PATH

    @property
    def webhook_url(self) -> str:
        return self.url + HOOK_PATH

    def env(self, *sinks: str) -> dict[str, str]:
        """The settings that send a gateway's alerts here (all three sinks by default)."""
        sinks = sinks or SINKS
        env: dict[str, str] = {}
        if "telegram" in sinks:
            env |= {"PGLEADER_TELEGRAM_URL": self.url, "PGLEADER_TELEGRAM_TOKEN": self.token,
                    "PGLEADER_TELEGRAM_CHAT_ID": self.chat_id}  # fmt: skip
        if "slack" in sinks:
            env["PGLEADER_SLACK_WEBHOOK_URL"] = self.slack_url
        if "webhook" in sinks:
            env["PGLEADER_ALERT_WEBHOOK_URL"] = self.webhook_url
        return env

    def texts(self, sink: str) -> list[str]:
        return [r.text for r in self.received[sink]]

    def bodies(self, sink: str) -> list[dict[str, Any]]:
        return [r.body for r in self.received[sink]]

    # -- the three APIs

    async def _fault(self, sink: str, body: dict[str, Any], text: str) -> tuple[int, int] | None:
        """The status of the fault this request meets and a 429's retry-after (None: none)."""
        self.requests[sink].append(time.monotonic())
        if not self.faults[sink]:
            return None
        fault = self.faults[sink].popleft()
        if fault == "hang":
            self.held[sink].append(Received(sink, text, body))
            await self._release.wait()
            return None
        status, _, retry = fault.partition(":")
        return int(status), int(retry or 0)

    async def _telegram(self, request: web.Request) -> web.Response:
        body = await _json(request)
        text = str(body.get("text") or "")
        fault = await self._fault("telegram", body, text)
        if fault is not None and fault[0] == 429:
            wait = fault[1]
            return _telegram_error(429, f"Too Many Requests: retry after {wait}",
                                   parameters={"retry_after": wait})  # fmt: skip
        if fault is not None:
            return _telegram_error(fault[0], _TELEGRAM_ERRORS.get(fault[0], "Error"))
        if request.match_info["token"] != self.token:
            return _telegram_error(401, "Unauthorized")
        if str(body.get("chat_id")) != self.chat_id:
            return _telegram_error(400, "Bad Request: chat not found")
        if not text.strip():
            return _telegram_error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _telegram_error(400, "Bad Request: message is too long")
        self._messages += 1
        self.received["telegram"].append(Received("telegram", text, body))
        return web.json_response({"ok": True, "result": {
            "message_id": self._messages, "from": {"id": 7001234567, "is_bot": True},
            "chat": {"id": int(self.chat_id), "type": "supergroup"},
            "date": int(time.time()), "text": text,
        }})  # fmt: skip

    async def _slack(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            return web.Response(status=400, text="invalid_payload")
        if not isinstance(body, dict):
            return web.Response(status=400, text="invalid_payload")
        text = str(body.get("text") or "")
        fault = await self._fault("slack", body, text)
        if fault is not None and fault[0] == 429:
            return web.Response(status=429, text="rate_limited",
                                headers={"Retry-After": str(fault[1])})  # fmt: skip
        if fault is not None:
            return web.Response(status=fault[0], text=_SLACK_ERRORS.get(fault[0], "error"))
        if request.path != SLACK_PATH:
            return web.Response(status=404, text="no_service")
        if not text.strip():
            return web.Response(status=400, text="no_text")
        self.received["slack"].append(Received("slack", text, body))
        return web.Response(text="ok")

    async def _webhook(self, request: web.Request) -> web.Response:
        body = await _json(request)
        fault = await self._fault("webhook", body, str(body.get("text") or ""))
        if fault is not None and fault[0] == 429:
            return web.json_response({"error": "slow down"}, status=429,
                                     headers={"Retry-After": str(fault[1])})  # fmt: skip
        if fault is not None:
            return web.json_response({"error": "fault"}, status=fault[0])
        if request.path != HOOK_PATH or not body:
            return web.json_response({"error": "unknown hook"}, status=404)
        self.received["webhook"].append(Received("webhook", str(body.get("text") or ""), body))
        return web.json_response({"ok": True})


def _telegram_error(code: int, description: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"ok": False, "error_code": code, "description": description, **extra}, status=code
    )


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
