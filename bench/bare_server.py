"""The web-layer ceiling: an aiohttp server whose webhook reads the body and answers
200 without touching a database. Same framework, same load generator as the gateway.

`python -m bench.bare_server --port N` prints {"event": "serving", ...} once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web

from pgleader.cli import run

__all__ = ["main"]


async def webhook(request: web.Request) -> web.Response:
    await request.read()
    # The gateway's answer shape, so the client reads the same bytes from both.
    return web.json_response({"status": "executed", "signal_id": 0})


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/webhook", webhook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(json.dumps({"event": "serving", "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    run(serve(parser.parse_args().port))  # the gateway's event loop (uvloop where installed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
