"""service.alerts: what a sink makes of an HTTP client's failure (never its text: it
quotes the URL, and the URL holds the secret), and what a message looks like.

No network: the failures are raised by a stand-in for the HTTP session.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from service.alerts.messages import REPEAT_NOTE, Event, render
from service.alerts.sinks import TEXT_LIMIT, Message, Sink, Slack, Telegram, Webhook

TOKEN = "7001234567:AAH-unit-token-Qw3"
SLACK = "https://hooks.slack.example/services/T0/B0/unitSlackSecret"
HOOK = "https://alerts.example/ingest?key=unitHookSecret"


class Failing:
    """An aiohttp session whose every request fails with `make(url)`."""

    timeout = aiohttp.ClientTimeout(total=3)

    def __init__(self, make: Any) -> None:
        self.make = make

    def post(self, url: str, **kwargs: Any) -> Any:
        raise self.make(url)


def _info(url: str) -> aiohttp.RequestInfo:
    return aiohttp.RequestInfo(URL(url), "POST", CIMultiDictProxy(CIMultiDict()), URL(url))


FAILURES = {
    "connect timeout": (lambda url: aiohttp.ConnectionTimeoutError(
        f"Connection timeout to host {url}"), "failed", "no connection within 3 s"),
    "read timeout": (lambda url: TimeoutError(), "unknown", "no answer within 3 s"),
    "invalid url": (lambda url: aiohttp.InvalidURL(url), "refused", "invalid URL"),
    "status": (lambda url: aiohttp.ClientResponseError(
        _info(url), (), status=502, message=f"Bad Gateway {url}"), "unknown", "unreadable answer"),
    "redirects": (lambda url: aiohttp.TooManyRedirects(_info(url), ()), "unknown",
                  "unreadable answer"),
    "disconnected": (lambda url: aiohttp.ServerDisconnectedError(url), "unknown",
                     "connection closed without an answer"),
    "reset": (lambda url: aiohttp.ClientOSError(104, f"Connection reset by peer {url}"),
              "unknown", "connection broken"),
    "bug": (lambda url: RuntimeError(f"something about {url}"), "unknown",
            "error (RuntimeError)"),
}  # fmt: skip
SINKS: list[tuple[Sink, tuple[str, ...]]] = [
    (Telegram("https://api.telegram.example", TOKEN, "-100"), (TOKEN,)),
    (Slack(SLACK), (SLACK, "/services/T0/B0/unitSlackSecret", "unitSlackSecret")),
    (Webhook(HOOK), (HOOK, "unitHookSecret")),
]


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("sink", [s for s, _ in SINKS], ids=lambda s: s.name)
async def test_a_failure_is_told_in_words_of_our_own_without_a_secret(sink, failure):
    make, outcome, detail = FAILURES[failure]
    sent = await sink.send(Failing(make), Message("hello", {"text": "hello"}))  # type: ignore[arg-type]
    assert (sent.outcome, sent.detail) == (outcome, f"{sink.name}: {detail}")
    secrets = dict((s.name, secret) for s, secret in SINKS)[sink.name]
    assert not [s for s in secrets if s in sent.detail]


def test_scrub_cuts_every_secret_out_of_any_text():
    telegram, slack = SINKS[0][0], SINKS[1][0]
    assert telegram.scrub(f"POST https://x/bot{TOKEN}/sendMessage failed") == (
        "POST https://x/bot***/sendMessage failed"
    )
    assert "unitSlackSecret" not in slack.scrub(f"{SLACK} and /services/T0/B0/unitSlackSecret")


def event(n: int, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "delivery_id": n, "repeat": False, "kind": "signal_in_doubt", "detail": f"item {n}",
        "at": datetime(2026, 12, 24, 9, 15, tzinfo=UTC), "instance": "gw1", "signal_id": None,
        "election": None, "epoch": None,
    }  # fmt: skip
    return Event(**(values | fields))


def test_a_group_fits_a_chat_message_and_names_every_event():
    events = [event(n, detail=f"item {n} " + "x" * 3000) for n in range(1, 21)]
    message = render(events, election="gateway", sender="gw2", epoch=7)
    assert len(message.text) <= TEXT_LIMIT
    assert message.text.startswith("CRITICAL 20 events (grouped) · pgleader gateway")
    assert all(f": item {n} x" in message.text for n in range(1, 21))
    assert [i["delivery_id"] for i in message.payload["items"]] == list(range(1, 21))
    assert message.payload["items"][0]["text"].endswith("x" * 3000)  # the webhook gets it whole


def test_a_repeat_and_a_transition_say_what_they_are():
    elected = event(3, kind="leader_elected", detail=None, election="gateway", epoch=5,
                    instance="gw2", previous_leader="gw1", previous_epoch=4,
                    previous_reason="evicted", repeat=True)  # fmt: skip
    message = render([elected], election="gateway", sender="gw2", epoch=5)
    assert message.text.splitlines() == [
        "WARNING leader_elected · pgleader gateway",
        "gw2 leads election gateway (epoch 5); gw1 (epoch 4) ended: evicted (it stopped beating)",
        "2026-12-24 09:15:00Z · gw2",
        REPEAT_NOTE,
    ]
    assert message.payload["repeat"] is True and message.payload["epoch"] == 5
