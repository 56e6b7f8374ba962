"""The campaign's signals: one strategy per instrument, long and short, as TradingView
would fire them.

Each `Trader` keeps the position its strategy believes it holds and picks its next
move from it: flat, an entry on either side; open, a pyramid, a partial exit, a
full exit (lots 0) or a reversal, whose exit and entry on the other side share one
second and go to different instances. Its moves are at least a second apart, so
the gateway's order within an instrument (by second, then EXIT before BASE_ENTRY
before PYRAMID) is the order they were fired in.

Two instruments trade seldom (SLOW, a move every SLOW_EVERY seconds): an order of
theirs that never reached the broker has no other order of the instrument near it,
the plainest case for settling to tell that it was never placed and send it again;
the busy ones have orders of their own around every claim, the case where settling
must tell its own earlier orders from the one in doubt.

While a roll of the futures falls due (the harness's `rollover` fault) their
strategies hold: they only enter on the side they hold, which adds to the position
or opens it again where the ledger went flat, so there is a position to roll.

A signal that was lost or refused makes the belief wrong for a while (a pyramid
with nothing open, an exit of the other side): the gateway refuses those with an
alert, and the next exit or entry brings the belief back in line, as it would for
a real strategy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tests.chaos.broker import Traded
from tests.support.gateway import signal_body

__all__ = ["MOVES", "SLOW", "SLOW_EVERY", "Move", "Trader"]

MOVES = ("entry", "pyramid", "partial_exit", "exit", "reversal")
SLOW = ("USDINR", "GOLDM")
SLOW_EVERY = (8.0, 12.0)  # seconds between two moves of a SLOW instrument


@dataclass(frozen=True)
class Move:
    kind: str  # one of MOVES
    bodies: list[dict[str, Any]]  # one, or a reversal's exit and entry (same second)


@dataclass
class Trader:
    instrument: Traded
    side: str | None = None  # what the strategy believes is open
    lots: int = 0
    trades: int = 0  # for the position labels
    last_at: datetime | None = None  # the time of its last move (one move per second)

    def next(self, rnd: random.Random, at: datetime, *, hold: bool = False) -> Move:
        """The next move at `at`, its belief updated as if every signal executes;
        `hold`: an entry, of one lot on the side it holds."""
        self.last_at = at
        if self.side is None:
            return Move("entry", [self._entry(rnd.choice(("long", "short")), rnd, at)])
        room = self.instrument.max_lots - self.lots
        if hold:
            self.lots += min(1, room)
            return Move("entry", [self._body("BASE_ENTRY", self.side, 1, at)])
        choices = {"exit": 2, "reversal": 2}
        if room > 0:
            choices["pyramid"] = 3
        if self.lots > 1:
            choices["partial_exit"] = 2
        kind = rnd.choices(list(choices), weights=list(choices.values()))[0]
        side = self.side
        if kind == "pyramid":
            lots = rnd.randint(1, min(2, room))
            self.lots += lots
            return Move(kind, [self._body("PYRAMID", side, lots, at)])
        if kind == "partial_exit":
            lots = rnd.randint(1, self.lots - 1)
            self.lots -= lots
            return Move(kind, [self._body("EXIT", side, lots, at)])
        exit_ = self._body("EXIT", side, 0, at)
        self.side, self.lots = None, 0
        if kind == "exit":
            return Move(kind, [exit_])
        other = "short" if side == "long" else "long"
        return Move(kind, [exit_, self._entry(other, rnd, at)])

    def _entry(self, side: str, rnd: random.Random, at: datetime) -> dict[str, Any]:
        self.trades += 1
        self.side, self.lots = side, rnd.randint(1, 2)
        return self._body("BASE_ENTRY", side, self.lots, at)

    def _body(self, kind: str, side: str, lots: int, at: datetime) -> dict[str, Any]:
        label = f"{side.capitalize()}_{self.instrument.name}_{self.trades}"
        return signal_body(
            type=kind, instrument=self.instrument.name, position=label, lots=lots, at=at, side=side
        )
