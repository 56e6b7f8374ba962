"""Position reconciliation: the ledger's open net positions against the broker's.

Per instrument (every one of the instruments file, and every one the ledger
holds), in units (lots x lot size, negative for short):

    matched            both hold the same, not flat
    orphaned           the ledger holds it, the broker nothing
    missing            the broker holds it, the ledger nothing
    quantity_mismatch  both hold something, not the same
    in_flight          an order of it is being executed: not compared now

Every run is a row of gateway.reconciliations (asked for by the leader when it
is elected, on its schedule, by an operator over HTTP or the CLI); the leader
runs what is asked and records the result, fenced by its epoch, with an alert
per item not matched. Reconciliation reports; it never trades.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import psycopg
import structlog
from psycopg_pool import AsyncConnectionPool

from pgleader import Elector, NotLeader
from pgleader.errors import first_line
from service.brokers.base import Broker, Instrument
from service.errors import BrokerError
from service.queries import QUERIES

__all__ = ["Reconciler", "as_run", "compare"]

log = structlog.get_logger("service.execution.reconciliation")

_REQUESTED = QUERIES["requested_reconciliations"]
_LEDGER = QUERIES["ledger_positions"]
_FINISH = QUERIES["finish_reconciliation"]
_IN_FLIGHT = QUERIES["instruments_in_flight"]


_COLUMNS = ("id", "trigger", "requested_by", "requested_at", "epoch", "instance_id",
            "finished_at", "outcome", "items", "detail")  # fmt: skip


def as_run(row: Sequence[Any]) -> dict[str, Any]:
    """A row of the `reconciliation` query as a dict (its outcome null: not run yet)."""
    return dict(zip(_COLUMNS, row, strict=True))


def compare(
    ledger: Mapping[str, int], broker: Mapping[str, int], in_flight: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """One item per instrument that is not flat on both sides, by name."""
    items = []
    for name in sorted({*ledger, *broker}):
        ours, theirs = ledger.get(name, 0), broker.get(name, 0)
        if name in in_flight:
            outcome = "in_flight"
        elif ours == theirs:
            if ours == 0:
                continue
            outcome = "matched"
        elif theirs == 0:
            outcome = "orphaned"
        elif ours == 0:
            outcome = "missing"
        else:
            outcome = "quantity_mismatch"
        items.append({"instrument": name, "outcome": outcome, "ledger": ours, "broker": theirs})
    return items


class Reconciler:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        elector: Elector,
        broker: Broker,
        resolve: Callable[[Iterable[str]], Awaitable[dict[str, Instrument]]],  # the executor's
        known: Mapping[str, Instrument] | None,
    ) -> None:
        self.pool = pool
        self.elector = elector
        self.broker = broker
        self.resolve = resolve
        self.known = known
        self.last: dict[str, Any] | None = None
        self._running = asyncio.Lock()  # the sweep and the `reconcile` job both ask

    async def run_requested(self) -> int:
        """Run every reconciliation asked for. Leader only; returns how many ran."""
        if not self.elector.is_leader:
            return 0
        async with self._running:
            async with self.pool.connection() as conn:
                requested = await (await conn.execute(_REQUESTED)).fetchall()
            for request_id, _trigger in requested:
                await self.run(int(request_id))
        return len(requested)

    async def run(self, request_id: int) -> str | None:
        """Compare, then record the result under our epoch; the outcome, or None
        when we lost the lead meanwhile (the next leader runs it)."""
        async with self.pool.connection() as conn:
            ledger_lots = dict(await (await conn.execute(_LEDGER)).fetchall())
            in_flight = frozenset(r[0] for r in await (await conn.execute(_IN_FLIGHT)).fetchall())
        names = sorted({*ledger_lots, *(self.known or {})})
        instruments = list((await self.resolve(names)).values())
        ledger = {i.name: int(ledger_lots.get(i.name, 0)) * i.lot_size for i in instruments}
        try:
            broker = await self.broker.positions(instruments) if instruments else {}
        except BrokerError as exc:
            outcome, items, detail = "failed", [], f"the broker cannot be asked: {exc}"
        else:
            items = compare(ledger, broker, in_flight)
            bad = [i for i in items if i["outcome"] not in ("matched", "in_flight")]
            outcome = "mismatch" if bad else "matched"
            detail = f"{len(items)} instrument(s) compared, {len(bad)} not matched"
        try:
            async with self.pool.connection() as conn, conn.transaction():
                epoch = await self.elector.fence(conn)
                await conn.execute(
                    _FINISH,
                    [
                        request_id,
                        epoch,
                        self.elector.instance_id,
                        outcome,
                        json.dumps(items),
                        detail,
                    ],
                )
        except (NotLeader, psycopg.Error) as exc:
            log.warning("reconciliation not recorded", error=first_line(exc))
            return None
        self.last = {"id": request_id, "outcome": outcome, "items": items, "detail": detail}
        log_at = log.info if outcome == "matched" else log.critical
        log_at("reconciliation", outcome=outcome, detail=detail)
        return outcome
