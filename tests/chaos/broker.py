"""The campaign's broker: the fake OpenAlgo (tests.support.openalgo) as a process of its
own, and the instruments the gateways trade on it.

Two of them are futures with a contract rule (service/contracts.py) on a calendar of
the suite's own: every day trades, all day in UTC, and the contracts expire 3, 33 and
63 days after the campaign's day. With roll_days_before 0 they trade the near
contract; the `rollover` fault rewrites the file with ROLL_DAYS_BEFORE, which puts
the day inside the near contract's roll window: the leader rolls them to the next.

The fake runs in analyze (sandbox) mode, as the gateways are configured, with
OpenAlgo's default limits unless told otherwise. It is never killed (its book is in
memory: a restart would forget the positions the checker compares), only paused
(SIGSTOP) and told to misbehave through `/_fake/faults`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from service.contracts import contract_symbol

__all__ = [
    "API_KEY",
    "INSTRUMENTS",
    "ROLL_DAYS_BEFORE",
    "FakeBroker",
    "Traded",
    "futures",
    "write_instruments_file",
]

API_KEY = "chaos-openalgo-key-3f9a"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Traded:
    """One table of the instruments file (service.instruments)."""

    name: str
    exchange: str
    symbol: str
    product: str
    lot_size: int
    max_lots: int
    # A future with a contract rule: `symbol` is its underlying, these its expiries.
    expiries: tuple[date, ...] = ()

    @property
    def contracts(self) -> list[str]:
        """Its symbols at the broker: one per contract (by expiry), or its symbol."""
        return [contract_symbol(self.symbol, day) for day in self.expiries] or [self.symbol]

    @property
    def keys(self) -> list[tuple[str, str, str]]:
        """Where the fake books it: symbol, exchange, product (of each contract)."""
        return [(symbol, self.exchange, self.product) for symbol in self.contracts]


# Several exchanges and products, lot sizes 1 to 1000; the sandbox refuses NRML on
# NSE equity and CNC on derivatives, so each product fits its exchange.
INSTRUMENTS = (
    Traded("NIFTY", "NFO", "NIFTY29DEC26FUT", "NRML", 75, 6),
    Traded("BANKNIFTY", "NFO", "BANKNIFTY29DEC26FUT", "NRML", 35, 6),
    Traded("CRUDEOILM", "MCX", "CRUDEOILM19JAN27FUT", "NRML", 10, 6),
    Traded("USDINR", "CDS", "USDINR29DEC26FUT", "NRML", 1000, 6),
    Traded("RELIANCE", "NSE", "RELIANCE", "MIS", 1, 6),
    Traded("GOLDM", "MCX", "GOLDM05FEB27FUT", "NRML", 1, 6),
)
ROLL_DAYS_BEFORE = 5  # trading days: the near contract, 3 days away, is in its roll window


def futures(today: date) -> tuple[Traded, ...]:
    """The futures with a contract rule of a campaign started on `today` (UTC)."""
    expiries = tuple(today + timedelta(days=days) for days in (3, 33, 63))
    return (
        Traded("FINNIFTY1!", "NFO", "FINNIFTY", "NRML", 65, 6, expiries),
        Traded("MIDCPNIFTY1!", "NFO", "MIDCPNIFTY", "NRML", 140, 6, expiries),
    )


def write_instruments_file(
    path: Path, instruments: tuple[Traded, ...] = INSTRUMENTS, *, roll_days_before: int = 0
) -> Path:
    """The instruments file, replaced whole (a starting instance never reads half of it)."""
    calendars = [
        f'[calendars.{exchange}]\ntimezone = "UTC"\nsession = "00:00-23:59"\n'
        'weekdays = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]\n'
        for exchange in sorted({i.exchange for i in instruments if i.expiries})
    ]
    tables = [
        f"[instruments.{json.dumps(i.name)}]\n"
        f'exchange = "{i.exchange}"\nproduct = "{i.product}"\n'
        f"lot_size = {i.lot_size}\nmax_lots = {i.max_lots}\n"
        + (
            f'underlying = "{i.symbol}"\nroll_days_before = {roll_days_before}\n'
            f"expiries = [{', '.join(day.isoformat() for day in i.expiries)}]\n"
            if i.expiries
            else f'symbol = "{i.symbol}"\n'
        )
        for i in instruments
    ]
    written = path.with_name(f".{path.name}.new")
    written.write_text("\n".join(calendars + tables))
    os.replace(written, path)
    return path


class FakeBroker:
    """`python -m tests.support.openalgo` as a child process, driven over HTTP."""

    def __init__(self, log_path: Path, *, rate: int = 10) -> None:
        self.log_path = log_path
        self.rate = rate
        self.url = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.paused = False

    async def start(self, timeout: float = 20) -> str:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.support.openalgo", "--port", "0",
                "--api-key", API_KEY, "--rate", str(self.rate), "--analyze",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = (await self.proc.stdout.readline()).decode()
        if not line.startswith("ready "):
            raise RuntimeError(f"the fake OpenAlgo did not start: {line!r}, see {self.log_path}")
        self.url = line.split()[1]
        return self.url

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        self.paused = False

    async def faults(self, **changes: Any) -> dict[str, Any]:
        """POST /_fake/faults; `clear=True` first clears every fault but the mode."""
        return await self._call("POST", "/_fake/faults", changes)

    async def state(self) -> dict[str, Any]:
        """GET /_fake/state: positions, max_abs_positions, orders (in fill order)..."""
        return await self._call("GET", "/_fake/state")

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            async with asyncio.timeout(10):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.request(method, f"{self.url}{path}", json=body) as response,
        ):
            response.raise_for_status()
            answer: dict[str, Any] = await response.json()
            return answer
