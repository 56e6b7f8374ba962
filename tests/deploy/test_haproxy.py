"""deploy/haproxy.cfg, run by a real HAProxy in front of three real gateways.

TLS ends at HAProxy and plain HTTP is refused, never redirected; only instances
whose /ready answers 200 are in the rotation; the retries the file documents hold
(a refused connection or a 503 is retried on another instance, a response timeout
is not); only the public surface passes; a source that keeps being refused is
slowed down.

The file is used as shipped: the test only sets the variables it reads (binds on
free ports of 127.0.0.1, a self-signed certificate, the gateways' addresses), and
adds a file of its own with a stats socket, to ask HAProxy which servers it routes
to. HAProxy's log (option httplog, on its stdout) says which instance answered each
request and whether it was retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pgleader.embedded import free_port
from tests.support.gateway import Cluster, GatewayProcess, cluster, signal_body, until
from tests.support.metrics import value

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
OPERATOR_PATHS = ["/signals/1", "/metrics", "/coordinator/leader", "/openapi.yaml", "/"]

# One request as option httplog writes it: "... webhooks~ gateways_ready/gateway1
# 0/0/0/3/3 200 150 - - ---- 1/1/0/0/+1 0/0 "POST /webhook HTTP/1.1"": the server
# that answered, the status, how the session ended, the retries ("+" if redispatched).
_LOGGED = re.compile(
    r"\] (?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) \S+ (?P<status>-?\d+) \S+"
    r" \S+ \S+ (?P<state>\S{4}) \d+/\d+/\d+/\d+/\+?(?P<retries>\d+) \S+ \"(?P<method>\S+)"
    r" (?P<path>\S+)"
)


@dataclass(frozen=True)
class Certificate:
    pem: Path  # certificate and private key, what `bind ... ssl crt` reads
    cert: Path  # the certificate alone, what a client trusts


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for 127.0.0.1, made as the README shows."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    pem = where / "gateway.pem"
    pem.write_text(cert.read_text() + key.read_text())
    return Certificate(pem, cert)


@dataclass(frozen=True)
class Logged:
    frontend: str
    backend: str
    server: str
    status: int
    state: str  # termination state: "----" ended normally, "sH--" server timeout
    retries: int
    method: str
    path: str

    @classmethod
    def of(cls, match: re.Match[str]) -> Logged:
        fields: dict[str, Any] = match.groupdict()
        fields.update(status=int(fields["status"]), retries=int(fields["retries"]))
        return cls(**fields)


@dataclass
class Haproxy:
    https: str
    http: str
    log_path: Path
    stats_socket: Path
    servers: dict[str, GatewayProcess]  # HAProxy's server name -> the instance behind it

    async def routed(self) -> dict[str, dict[str, str]]:
        """HAProxy's view of each server of gateways_ready (`show stat` on its stats
        socket): status ("UP", "DOWN", "UP 1/2": going down), check health and bounds."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(b"show stat\n")
            header, *rows = (await reader.read()).decode().strip().splitlines()
        finally:
            writer.close()
            await writer.wait_closed()
        columns = header.lstrip("# ").split(",")
        stat = [dict(zip(columns, row.split(","), strict=False)) for row in rows]
        return {row["svname"]: row for row in stat if row["pxname"] == "gateways_ready"}

    async def all_in_rotation(self) -> bool:
        """Every gateway is UP past HAProxy's start-up grace. At start a server's health
        is at the threshold and one failed check takes it out; once it has passed a
        check, it takes `fall` (two) a second apart, as the file says."""
        try:
            routed = await self.routed()
        except (FileNotFoundError, ConnectionRefusedError):
            return False  # not listening yet
        return all(
            routed[name]["status"] == "UP"
            and int(routed[name]["check_health"])
            == int(routed[name]["check_rise"]) + int(routed[name]["check_fall"]) - 1
            for name in self.servers
        )

    async def out_of_rotation(self, server: str) -> bool:
        return (await self.routed())[server]["status"].startswith("DOWN")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def requests(self, since: int = 0) -> list[Logged]:
        """The requests logged after the first `since` characters of the log."""
        return [Logged.of(m) for m in _LOGGED.finditer(self.log()[since:])]

    async def logged(self, count: int, since: int = 0) -> list[Logged]:
        """The first `count` webhooks logged after `since`, once they all are (HAProxy
        logs a request as it ends, maybe after the client has read the answer)."""

        async def all_there() -> bool:
            return len(self.webhooks(since)) >= count

        await until(all_there, timeout=10)
        return self.webhooks(since)[:count]

    def webhooks(self, since: int = 0) -> list[Logged]:
        return [r for r in self.requests(since) if r.path == "/webhook"]

    def server_of(self, node: GatewayProcess) -> str:
        return next(name for name, behind in self.servers.items() if behind is node)


@contextlib.asynccontextmanager
async def haproxy(
    nodes: list[GatewayProcess], tmp_path: Path, certificate: Certificate
) -> AsyncIterator[Haproxy]:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(binary).exists(), (
        "haproxy is not installed: `make test` installs it (Debian: haproxy)"
    )
    https_port, http_port = free_port(), free_port()
    servers = {f"gateway{i}": node for i, node in enumerate(nodes, 1)}
    env = {
        **os.environ,
        "PGLEADER_LB_HTTPS_BIND": f"127.0.0.1:{https_port}",
        "PGLEADER_LB_HTTP_BIND": f"127.0.0.1:{http_port}",
        "PGLEADER_LB_CERT": str(certificate.pem),
        **{f"PGLEADER_LB_{name.upper()}": f"127.0.0.1:{n.port}" for name, n in servers.items()},
    }
    check = await asyncio.to_thread(
        subprocess.run, [binary, "-c", "-f", str(CONFIG)], capture_output=True, text=True, env=env
    )
    assert check.returncode == 0, check.stderr
    # The test's own second file, beside the shipped one: a stats socket to ask HAProxy
    # which servers it routes to.
    stats_socket = tmp_path / "haproxy.sock"
    stats_config = tmp_path / "stats.cfg"
    stats_config.write_text(f"global\n    stats socket {stats_socket} mode 600 level user\n")
    log_path = tmp_path / "haproxy.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            binary, "-db", "-f", str(CONFIG), "-f", str(stats_config),
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        yield Haproxy(
            f"https://127.0.0.1:{https_port}",
            f"http://127.0.0.1:{http_port}",
            log_path,
            stats_socket,
            servers,
        )
    finally:
        proc.terminate()
        await proc.wait()


async def status_of(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> int | None:
    """The answer's status, None when no answer came (connection refused or reset)."""
    try:
        async with http.request(method, url, **kw) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return None


@dataclass
class Front:
    """Three gateways, the shipped HAProxy in front of them, and a client that trusts
    only the test's certificate."""

    gw: Cluster
    nodes: list[GatewayProcess]
    lb: Haproxy
    https: aiohttp.ClientSession

    async def post_accepted(self, count: int, *, at_once: bool = False) -> list[int]:
        """Post `count` webhooks, one after another or all at once; each must be
        answered 2xx. Their signal ids."""
        if at_once:
            return list(await asyncio.gather(*(self.post_one() for _ in range(count))))
        return [await self.post_one() for _ in range(count)]

    async def post_one(self) -> int:
        async with self.https.post(f"{self.lb.https}/webhook", json=signal_body()) as resp:
            answer = await resp.json(content_type=None)
            assert resp.status in (200, 202), answer
        return int(answer["signal_id"])

    async def received_by(self, signal_ids: list[int]) -> dict[int, str]:
        rows = await self.gw.query(
            "select id, received_by from gateway.signals where id = any(%s)", signal_ids
        )
        return dict(rows)

    async def follower(self) -> GatewayProcess:
        leader = await self.gw.leader()
        return next(node for node in self.nodes if node is not leader)


@contextlib.asynccontextmanager
async def behind_haproxy(
    dsn: str, tmp_path: Path, certificate: Certificate, *gateway_args: str
) -> AsyncIterator[Front]:
    """Three gateways (`gateway_args` for each), each ready, and HAProxy routing to them."""
    async with cluster(dsn, tmp_path) as gw:
        nodes = await gw.start(3, *gateway_args)
        trust = ssl.create_default_context(cafile=str(certificate.cert))
        async with (
            haproxy(nodes, tmp_path, certificate) as lb,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=trust),
                timeout=aiohttp.ClientTimeout(total=15),
            ) as https,
        ):

            async def all_ready() -> bool:
                direct = [await status_of(gw.http, "GET", f"{n.url}/ready") for n in nodes]
                return direct == [200] * 3 and await lb.all_in_rotation()

            await until(all_ready, timeout=20)
            yield Front(gw, nodes, lb, https)


# --- TLS in front, plain HTTP refused ---------------------------------------------


async def test_a_webhook_over_tls_reaches_a_ready_instance(dsn, tmp_path, certificate):
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        # The client verifies the certificate served against the test's own: TLS ends at HAProxy.
        ids = await front.post_accepted(6)
        receivers = await front.received_by(ids)
        assert sorted(receivers) == sorted(ids)
        # Round robin over the three ready instances.
        assert set(receivers.values()) == {node.instance_id for node in front.nodes}
        logged = await front.lb.logged(6)
        assert {r.frontend for r in logged} == {"webhooks~"}  # "~": over TLS
        assert all(r.status in (200, 202) and r.retries == 0 for r in logged), logged


async def test_plain_http_is_refused_never_redirected(dsn, tmp_path, certificate):
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        for method, path in [("POST", "/webhook"), ("GET", "/ready"), ("GET", "/")]:
            async with front.gw.http.request(
                method, f"{front.lb.http}{path}", json=signal_body(), allow_redirects=False
            ) as resp:
                assert resp.status == 403, path
                assert "Location" not in resp.headers, path
                answer = await resp.json(content_type=None)
            assert answer["status"] == "https_required", path
            assert "https://" in answer["error"]
        assert await front.gw.scalar("select count(*) from gateway.signals") == 0

        def plain() -> list[Logged]:
            return [r for r in front.lb.requests() if r.frontend == "plain_http"]

        async def all_logged() -> bool:
            return len(plain()) >= 3

        await until(all_logged, timeout=10)
        # Answered by HAProxy itself: no server saw any of them.
        assert {(r.server, r.status) for r in plain()} == {("<NOSRV>", 403)}


async def test_only_the_public_surface_passes(dsn, tmp_path, certificate):
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        (signal_id,) = await front.post_accepted(1)
        for path in [*OPERATOR_PATHS, f"/signals/{signal_id}"]:
            for method in ("GET", "POST"):
                async with front.https.request(method, f"{front.lb.https}{path}") as resp:
                    assert resp.status == 404, (method, path)
                    assert (await resp.json(content_type=None))["status"] == "not_found"
        # ...while the operator's listener, which HAProxy does not front, has it all.
        async with front.gw.http.get(f"{front.nodes[0].operator_url}/signals/{signal_id}") as resp:
            assert resp.status == 200


# --- the rotation and the retries -------------------------------------------------


@contextlib.asynccontextmanager
async def slow_client(node: GatewayProcess, http: aiohttp.ClientSession) -> AsyncIterator[None]:
    """A client of `node`'s operator listener that sends a request head and part of
    its body, then stalls. A SIGTERM meanwhile leaves the instance draining (not
    ready, answering webhooks 503) until that request ends: answered 408 when its
    body has not come within the request timeout."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.operator_port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\nContent-Length: 2\r\n\r\n{")
        await writer.drain()
        # A later request on the same listener answered: the stalled one is being handled.
        assert await status_of(http, "GET", f"{node.operator_url}/health") == 200
        yield
        head = await asyncio.wait_for(reader.readline(), 30)
        assert head.startswith(b"HTTP/1.1 408 "), head
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_draining_instance_leaves_the_rotation_and_its_503s_are_retried(
    dsn, tmp_path, certificate
):
    # The stalled client holds the drain open for 8 s: long enough for HAProxy to notice.
    async with behind_haproxy(dsn, tmp_path, certificate, "--request-timeout", "8") as front:
        draining = await front.follower()
        server = front.lb.server_of(draining)
        async with slow_client(draining, front.gw.http):
            draining.signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return await status_of(front.gw.http, "GET", f"{draining.url}/ready") == 503

            await until(not_ready)
            # HAProxy has not noticed yet (two failed checks a second apart): of three
            # webhooks at once, round robin sends one to the draining instance, which
            # answers 503; HAProxy retries it on another and the client sees 2xx.
            before = await front.post_accepted(3, at_once=True)
            retried = [r for r in await front.lb.logged(3) if r.retries]
            assert retried, front.lb.webhooks()
            assert server not in {r.server for r in retried}, retried

            await until(lambda: front.lb.out_of_rotation(server), timeout=10)
            since = len(front.lb.log())
            after = await front.post_accepted(6)
            logged = await front.lb.logged(6, since)
            assert {r.server for r in logged} == set(front.lb.servers) - {server}, logged
            assert not any(r.retries for r in logged), logged
            receivers = await front.received_by(before + after)
            assert len(receivers) == 9 and draining.instance_id not in receivers.values()
        # The stalled request ended: the instance resigns and exits.
        assert await draining.wait() == 0


async def test_a_stopped_instance_costs_a_retry_not_a_webhook(dsn, tmp_path, certificate):
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        stopped = await front.follower()
        stopped.signal(signal.SIGKILL)
        await stopped.wait()
        # Still in the rotation for a second or two: of three webhooks at once, the one
        # sent its way finds the connection refused and goes to another instance.
        ids = await front.post_accepted(3, at_once=True)
        logged = await front.lb.logged(3)
        assert any(r.retries for r in logged), logged
        assert front.lb.server_of(stopped) not in {r.server for r in logged}
        receivers = await front.received_by(ids)
        assert len(receivers) == 3 and stopped.instance_id not in receivers.values()


async def test_a_hung_instance_is_not_retried(dsn, tmp_path, certificate):
    """A response timeout is answered 504 (timeout server: 2.5 s), not retried: the
    instance may have taken the signal, and a retry would take as long again."""
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        hung = await front.follower()
        hung.signal(signal.SIGSTOP)
        try:
            url = f"{front.lb.https}/webhook"
            statuses = await asyncio.gather(
                *(status_of(front.https, "POST", url, json=signal_body()) for _ in range(3))
            )
        finally:
            hung.signal(signal.SIGCONT)
        assert [s for s in statuses if s not in (200, 202)] == [504], statuses
        (timed_out,) = [r for r in await front.lb.logged(3) if r.status == 504]
        assert timed_out.server == front.lb.server_of(hung), timed_out
        assert timed_out.state.startswith("sH") and timed_out.retries == 0, timed_out


# --- a source that keeps being refused --------------------------------------------


async def test_haproxy_slows_down_a_source_that_keeps_failing_authentication(
    dsn, tmp_path, certificate
):
    async with behind_haproxy(dsn, tmp_path, certificate) as front:
        url = f"{front.lb.https}/webhook"
        statuses = [
            await status_of(front.https, "POST", url, json=signal_body(secret="guess"))
            for _ in range(40)
        ]
        assert statuses[:10] == [401] * 10  # refused by the gateways, which count them
        assert statuses[-5:] == [429] * 5, statuses  # then HAProxy stops forwarding
        counted = 0
        for node in front.nodes:
            async with front.gw.http.get(f"{node.operator_url}/metrics") as resp:
                text = await resp.text()
            labels = {"listener": "public", "code": "401", "reason": "secret"}
            counted += value(text, "gateway_http_rejections_total", **labels) or 0
        assert counted == statuses.count(401)
