"""`pgleader serve` with no DSN, as root, in a checkout the postgres user cannot reach
(a clone in /root, mode 700): the README's first command must still work, and keep its
data between runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from pgleader.embedded import RELOCATED_CLUSTERS, EmbeddedPostgres, cluster_dir, free_port
from tests.support.gateway import SECRET, signal_body


def _postgres_user() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not _postgres_user(),
    reason="as root only: the embedded server then runs as the postgres user",
)


class Serve:
    """One `pgleader serve` without a DSN: it starts (or shares) an embedded cluster."""

    def __init__(self, data_dir: Path, embedded_port: int, name: str) -> None:
        self.data_dir = data_dir
        self.embedded_port = embedded_port
        self.port, self.operator_port = free_port(), free_port()
        self.log = data_dir.parent / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Serve:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGLEADER_")}
        env.pop("DATABASE_URL", None)
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pgleader", "serve", "--data-dir", str(self.data_dir),
                "--port", str(self.port), "--operator-port", str(self.operator_port),
                "--embedded-port", str(self.embedded_port), "--log-format", "json",
                stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**env, "PGLEADER_WEBHOOK_SECRET": SECRET},
            )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(90):  # initdb on a first start
            line = await self.proc.stdout.readline()
        assert line and json.loads(line)["event"] == "serving", self.log.read_text()[-2000:]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(40):
                assert await self.proc.wait() == 0

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.log.read_text().splitlines() if x.startswith("{")]
        return [e for e in lines if e.get("event") == name]


@pytest.fixture
async def locked_checkout() -> AsyncIterator[Path]:
    """A data dir under a fresh root-owned 0700 directory, like a clone in /root."""
    top = Path(tempfile.mkdtemp(prefix="pgleader-root-"))  # mkdtemp: mode 0700
    assert top.stat().st_mode & 0o777 == 0o700
    data_dir = top / "checkout" / "var"
    data_dir.parent.mkdir()
    cluster = cluster_dir(data_dir)
    try:
        yield data_dir
    finally:
        with contextlib.suppress(Exception):
            EmbeddedPostgres(cluster).stop("immediate")
        shutil.rmtree(cluster, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


async def test_serve_as_root_in_an_unreachable_checkout_runs_and_keeps_its_cluster(
    locked_checkout,
):
    data_dir = locked_checkout
    cluster = cluster_dir(data_dir)
    assert cluster.is_relative_to(RELOCATED_CLUSTERS), "the checkout should be unreachable"
    port = free_port()
    body = signal_body()
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with Serve(data_dir, port, "first") as first:
            async with http.get(f"http://127.0.0.1:{first.port}/health") as resp:
                assert resp.status == 200
            async with http.post(f"http://127.0.0.1:{first.port}/webhook", json=body) as resp:
                answer = await resp.json()
                assert resp.status in (200, 202) and answer["signal_id"] == 1, answer
        (started,) = first.events("embedded PostgreSQL started")
        assert started["cluster"] == str(cluster) and "postgres user" in started["why"]
        assert (cluster / "PG_VERSION").exists() and cluster.stat().st_uid != 0
        assert not (data_dir / "pg").exists()
        assert (data_dir / "spool").is_dir()  # the spool stays in the data directory

        async with Serve(data_dir, port, "second") as second:
            (again,) = second.events("embedded PostgreSQL started")
            assert again["cluster"] == str(cluster)
            async with http.post(f"http://127.0.0.1:{second.port}/webhook", json=body) as resp:
                answer = await resp.json()
                assert (resp.status, answer["status"], answer["signal_id"]) == (
                    200,
                    "duplicate",
                    1,
                ), answer
            dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
            async with await psycopg.AsyncConnection.connect(dsn) as conn:
                cur = await conn.execute("select count(*) from gateway.signals")
                assert await cur.fetchone() == (1,)
