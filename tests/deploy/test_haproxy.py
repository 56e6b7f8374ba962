"""deploy/haproxy.cfg, run by a real HAProxy in front of a real gateway: only the
public surface passes, and a source that keeps being refused is slowed down.

The file is used as shipped; only what names the compose network is rewritten
(the gateways' addresses, the address HAProxy binds).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from pgleader.embedded import free_port
from tests.support.gateway import GatewayProcess, signal_body, until

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"


@contextlib.asynccontextmanager
async def haproxy(gateway_port: int, tmp_path: Path) -> AsyncIterator[str]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(binary).exists(), (
        "haproxy is not installed: `make test` installs it (Debian: haproxy)"
    )
    port = free_port()
    text = re.sub(r"gateway\d:8080", f"127.0.0.1:{gateway_port}", CONFIG.read_text())
    text = text.replace("bind :8080", f"bind 127.0.0.1:{port}")
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    check = await asyncio.to_thread(
        subprocess.run, [binary, "-c", "-f", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    proc = await asyncio.create_subprocess_exec(
        binary, "-db", "-f", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> int:
    async with http.request(method, url, **kw) as resp:
        await resp.read()
        return resp.status


async def ready(http: aiohttp.ClientSession, lb: str) -> bool:
    """HAProxy is up and routes to a gateway it checked."""
    try:
        return await status_of(http, "GET", f"{lb}/ready") == 200
    except aiohttp.ClientError:
        return False


@contextlib.asynccontextmanager
async def gateway_behind_haproxy(
    dsn: str, tmp_path: Path, name: str
) -> AsyncIterator[tuple[GatewayProcess, str, aiohttp.ClientSession]]:
    """A gateway, the shipped HAProxy config in front of it (routing once it checked
    the gateway's /ready), and an HTTP session."""
    gw = GatewayProcess(dsn, name, tmp_path)
    await gw.start()
    try:
        async with haproxy(gw.port, tmp_path) as lb, aiohttp.ClientSession() as http:
            await until(lambda: ready(http, lb), timeout=20)
            yield gw, lb, http
    finally:
        await gw.stop()


async def test_haproxy_passes_the_webhook_and_nothing_of_the_operators(dsn, tmp_path):
    async with gateway_behind_haproxy(dsn, tmp_path, "behind1") as (gw, lb, http):
        async with http.post(f"{lb}/webhook", json=signal_body()) as resp:
            assert resp.status in (200, 202), await resp.text()
            signal_id = (await resp.json())["signal_id"]
        for method, path in [
            ("GET", f"/signals/{signal_id}"),
            ("GET", "/metrics"),
            ("GET", "/coordinator/leader"),
            ("POST", "/coordinator/resign"),
            ("GET", "/openapi.yaml"),
        ]:
            async with http.request(method, f"{lb}{path}") as resp:
                assert resp.status == 404, path
                assert (await resp.json(content_type=None))["status"] == "not_found"
        # ...while the operator's listener, which HAProxy does not front, has it all.
        async with http.get(f"{gw.operator_url}/signals/{signal_id}") as resp:
            assert resp.status == 200


async def test_haproxy_slows_down_a_source_that_keeps_failing_authentication(dsn, tmp_path):
    async with gateway_behind_haproxy(dsn, tmp_path, "guessed1") as (gw, lb, http):
        statuses = [
            await status_of(http, "POST", f"{lb}/webhook", json=signal_body(secret="guess"))
            for _ in range(40)
        ]
        assert statuses[:10] == [401] * 10  # refused by the gateway, which counts them
        assert statuses[-5:] == [429] * 5, statuses  # then HAProxy stops forwarding
        reached = statuses.count(401)
        async with http.get(f"{gw.operator_url}/metrics") as resp:
            text = await resp.text()
        line = 'gateway_http_rejections_total{listener="public",code="401",reason="secret"}'
        assert f"{line} {reached}" in text
