"""A tiny TCP proxy that can blackhole its traffic, to stage a network partition.

`blackhole()` stops forwarding in both directions without closing anything:
both ends keep their sockets, their kernels keep answering keepalives, and
nothing arrives, like a partition between two hosts (a lost route, a silently
dropping firewall). New connections are accepted but never reach the server.
`heal()` delivers what was held and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["Proxy"]


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()  # one per connection

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def blackhole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    @property
    def partitioned(self) -> bool:
        return not self._open.is_set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._handlers.add(me)
            me.add_done_callback(self._handlers.discard)
        # close() cancels us: that is the end of this connection, not an error (a
        # handler task ending cancelled makes asyncio log a traceback).
        with contextlib.suppress(asyncio.CancelledError):
            await self._forward(client_r, client_w)

    async def _forward(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        writers = [client_w]
        pumps: list[asyncio.Task[None]] = []
        try:
            await self._open.wait()  # a partitioned network connects nowhere
            try:
                server_r, server_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                return
            writers.append(server_w)
            pumps = [
                asyncio.create_task(self._pump(client_r, server_w)),
                asyncio.create_task(self._pump(server_r, client_w)),
            ]
            # Either side closing closes both, as a real connection would.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in writers:
                writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                # Waiting before the read too: while partitioned, nothing is read, so
                # the sender's socket buffers fill as they would on a dead route.
                await self._open.wait()
                data = await src.read(65536)
                if not data:
                    return
                await self._open.wait()
                dst.write(data)
                await dst.drain()
