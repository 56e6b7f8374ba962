"""The campaign's broker: the fake OpenAlgo (tests.support.openalgo) as a process of its
own, and the instruments the gateways trade on it.

The fake runs in analyze (sandbox) mode, as the gateways are configured, with
OpenAlgo's default limits unless told otherwise. It is never killed (its book is in
memory: a restart would forget the positions the checker compares), only paused
(SIGSTOP) and told to misbehave through `/_fake/faults`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["API_KEY", "INSTRUMENTS", "FakeBroker", "Traded", "write_instruments_file"]

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

    @property
    def key(self) -> tuple[str, str, str]:
        """Where the fake books it: symbol, exchange, product."""
        return (self.symbol, self.exchange, self.product)


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


def write_instruments_file(path: Path, instruments: tuple[Traded, ...] = INSTRUMENTS) -> Path:
    tables = [
        f'[instruments.{i.name}]\nexchange = "{i.exchange}"\nsymbol = "{i.symbol}"\n'
        f'product = "{i.product}"\nlot_size = {i.lot_size}\nmax_lots = {i.max_lots}\n'
        for i in instruments
    ]
    path.write_text("\n".join(tables))
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
