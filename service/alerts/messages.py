"""What an alert sink is sent: one event, or a group of them, as chat text and as JSON.

An event is a row of gateway.alerts or a leadership transition (the epoch a
leader gained, and how the epoch before it ended), as the delivery claim returns
it. A delivery that may have reached the sink before is said to be a repeat, in
the text and in the JSON (`"repeat": true`), so that a reader can tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.alerts.sinks import TEXT_LIMIT, Message

__all__ = ["REPEAT_NOTE", "Event", "direct_message", "probe_message", "render"]

REPEAT_NOTE = "(repeat: a previous leader may have sent this)"
_GROUP_LINE = 180  # characters of one event in a grouped chat message
_SEVERITIES = ("info", "warning", "critical")
# Alerts that mean money may be at risk, nothing trades, or a trade was lost: page someone.
_CRITICAL = ("in_doubt", "unauthorised", "mismatch", "missing", "orphaned", "mode_mismatch",
             "spool_full", "disk_full", "halted", "failed", "rewound",
             "invalid")  # fmt: skip
_REASONS = {
    "session_ended": "lost (its session ended)",
    "evicted": "evicted (it stopped beating)",
    "shutdown": "resigned at shutdown",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One delivery's event, as gateway.claim_alert_deliveries returns it."""

    delivery_id: int
    repeat: bool
    kind: str
    detail: str | None
    at: datetime | None
    instance: str | None
    signal_id: int | None
    election: str | None  # a transition's; None for an alert
    epoch: int | None
    previous_leader: str | None = None
    previous_epoch: int | None = None
    previous_reason: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Event:
        return cls(*row)

    @property
    def is_transition(self) -> bool:
        return self.epoch is not None

    @property
    def severity(self) -> str:
        if self.is_transition:
            ended_badly = self.previous_reason in ("session_ended", "evicted")
            return "warning" if ended_badly else "info"
        if any(word in self.kind for word in _CRITICAL):
            return "critical"
        return "warning"

    @property
    def text(self) -> str:
        if not self.is_transition:
            signal = f" (signal {self.signal_id})" if self.signal_id is not None else ""
            return f"{self.detail or ''}{signal}".strip()
        text = f"{self.instance} leads election {self.election} (epoch {self.epoch})"
        if self.previous_leader is not None:
            reason = self.previous_reason or "not recorded"
            text += (
                f"; {self.previous_leader} (epoch {self.previous_epoch}) ended:"
                f" {_REASONS.get(reason, reason)}"
            )
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "title": self.kind,
            "text": self.text,
            "at": _iso(self.at),
            "election": self.election,
            "epoch": self.epoch,
            "instance": self.instance,
            "signal_id": self.signal_id,
            "delivery_id": self.delivery_id,
            "repeat": self.repeat,
        }


def render(events: Sequence[Event], *, election: str, sender: str, epoch: int) -> Message:
    """One message of `events` (one alone, or grouped), sent by leader `sender`."""
    repeat = any(e.repeat for e in events)
    if len(events) == 1:
        event = events[0]
        lines = [
            f"{event.severity.upper()} {event.kind} · pgleader {election}",
            event.text,
            f"{_clock(event.at)} · {event.instance or '-'}",
        ]
        if repeat:
            lines.append(REPEAT_NOTE)
        payload = {**event.as_json(), "sender": {"instance": sender, "epoch": epoch}}
        if not event.is_transition:
            payload["election"], payload["epoch"] = election, epoch
        return Message(_fit("\n".join(lines)), payload)
    severity = max((e.severity for e in events), key=_SEVERITIES.index)
    title = f"{len(events)} events"
    lines = [f"{severity.upper()} {title} (grouped) · pgleader {election}"]
    for e in events:
        mark = " (repeat)" if e.repeat else ""
        lines.append(_cut(f"• {_clock(e.at)} {e.severity.upper()} {e.kind}{mark}: {e.text}"))
    if repeat:
        lines.append(REPEAT_NOTE.replace("this", "some of these"))
    payload = {
        "kind": "group",
        "severity": severity,
        "title": title,
        "text": "\n".join(lines),
        "at": _iso(datetime.now(UTC)),
        "election": election,
        "epoch": epoch,
        "instance": sender,
        "repeat": repeat,
        "items": [e.as_json() for e in events],
        "sender": {"instance": sender, "epoch": epoch},
    }
    return Message(_fit("\n".join(lines)), payload)


def probe_message(sender: str) -> Message:
    """What `pgleader sinks test` sends."""
    text = (
        f"pgleader: test message from {sender} at {_clock(datetime.now(UTC))} (pgleader sinks test)"
    )
    return direct_message("test", "info", "test message", text, sender, chat=text)


def direct_message(
    kind: str, severity: str, title: str, text: str, sender: str, *, chat: str | None = None
) -> Message:
    """A message an instance sends itself, with no event of the database behind it (no
    election, no epoch); `chat` the chats' text (default: a heading line, then `text`)."""
    chat = chat or f"{severity.upper()} {kind} · pgleader {sender}\n{text}"
    return Message(chat, {
        "kind": kind, "severity": severity, "title": title, "text": text,
        "at": _iso(datetime.now(UTC)), "election": None, "epoch": None, "instance": sender,
        "repeat": False, "sender": {"instance": sender, "epoch": None},
    })  # fmt: skip


def _cut(line: str) -> str:
    line = " ".join(line.split())
    return line if len(line) <= _GROUP_LINE else line[: _GROUP_LINE - 1] + "…"


def _fit(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def _clock(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if at else "-"


def _iso(at: datetime | None) -> str | None:
    return at.astimezone(UTC).isoformat() if at else None
