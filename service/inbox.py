"""The signal inbox: store a signal once (by fingerprint), read it back.

Storing also NOTIFYs `gateway_signals` with the new id, delivered on commit, so
the leader wakes up even when another instance received the signal. The leader
storing a signal it executes at once skips that NOTIFY (it would only come back
to itself); if it then cannot execute it, it sends the NOTIFY after all
(`notify_signal`), so a successor hears of the signal without waiting for a sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from service.signals import Signal

__all__ = ["NOTIFY_CHANNEL", "Stored", "get_signal", "notify_signal", "store_signal"]

NOTIFY_CHANNEL = "gateway_signals"

_INSERT = """
with new as (
    insert into gateway.signals
        (fingerprint, type, instrument, position, lots, price, stop, signal_at, payload,
         received_by, received_at)
    values (%(fp)s, %(type)s, %(instrument)s, %(position)s, %(lots)s, %(price)s, %(stop)s,
            %(signal_at)s, %(payload)s, %(received_by)s, coalesce(%(received_at)s, now()))
    on conflict (fingerprint) do nothing
    returning id
)
select id, case when %(notify)s then pg_notify('gateway_signals', id::text) end from new
"""
_EXISTING = "select id from gateway.signals where fingerprint = %s"


@dataclass(frozen=True, slots=True)
class Stored:
    signal_id: int
    duplicate: bool


async def store_signal(
    conn: AsyncConnection[Any],
    signal: Signal,
    fingerprint: str,
    received_by: str,
    received_at: datetime | None = None,
    *,
    notify: bool = True,
) -> Stored:
    """Insert the signal unless its fingerprint is known; either way return its id."""
    cur = await conn.execute(
        _INSERT,
        {
            "fp": fingerprint,
            "type": signal.type.name,
            "instrument": signal.instrument,
            "position": signal.position,
            "lots": signal.lots,
            "price": signal.price,
            "stop": signal.stop,
            "signal_at": signal.timestamp,
            "payload": json.dumps(signal.payload()),
            "received_by": received_by,
            "received_at": received_at,
            "notify": notify,
        },
    )
    row = await cur.fetchone()
    if row is not None:
        return Stored(int(row[0]), duplicate=False)
    # A concurrent insert of the same fingerprint committed first: read it back.
    cur = await conn.execute(_EXISTING, [fingerprint])
    row = await cur.fetchone()
    assert row is not None, "fingerprint conflict without a row"
    return Stored(int(row[0]), duplicate=True)


async def notify_signal(conn: AsyncConnection[Any], signal_id: int) -> None:
    await conn.execute("select pg_notify(%s, %s)", [NOTIFY_CHANNEL, str(signal_id)])


async def get_signal(conn: AsyncConnection[Any], signal_id: int) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "select id as signal_id, status, type, instrument, position, lots, price, stop,"
            " signal_at, received_by, received_at, claimed_epoch, claimed_by, finished_at, detail,"
            " (select json_agg(json_build_object('client_order_id', o.client_order_id,"
            "   'epoch', o.epoch, 'broker_order_id', o.broker_order_id, 'outcome', o.outcome)"
            "   order by o.id) from gateway.orders o where o.signal_id = s.id) as orders"
            " from gateway.signals s where id = %s",
            [signal_id],
        )
        return await cur.fetchone()
