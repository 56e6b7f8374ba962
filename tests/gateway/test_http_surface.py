"""The HTTP surface is safe to expose: a public listener that holds nothing for a
stranger, an operator's listener apart, refusals counted and logged sampled.

One real `pgleader serve` for the module, spoken to over raw sockets where the
point is what a client sends byte by byte.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pgleader.embedded import free_port
from tests.support.database import cloned_database
from tests.support.gateway import ADMIN_TOKEN, SECRET, GatewayProcess, signal_body
from tests.support.metrics import value

OPERATOR_TOKEN = "operator-token-77ab"
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
def surface_dsn(pg_template: Any) -> Iterator[str]:
    with cloned_database(pg_template, "pgleader_surface") as dsn:
        yield dsn


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(surface_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    gw = GatewayProcess(
        surface_dsn, "surface1", Path(tmp_path_factory.mktemp("surface")),
        "--request-timeout", "1", "--max-connections", str(MAX_CONNECTIONS),
        "--operator-token", OPERATOR_TOKEN,
    )  # fmt: skip
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def exchange(port: int, raw: bytes, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one answer: (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (bounded by the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def log_records(node: GatewayProcess) -> list[dict[str, Any]]:
    records = []
    for line in node.log_path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"level": "raw", "event": line})
    return records


def metric(node: GatewayProcess, name: str, **labels: str) -> float:
    status, _, body = exchange(
        node.operator_port,
        request("GET", "/metrics", b"", f"Authorization: Bearer {OPERATOR_TOKEN}"),
    )
    assert status == 200
    found = value(body.decode(), name, **labels)
    return 0.0 if found is None else found


# --- a stranger holds nothing for long ---------------------------------------------


def test_a_request_head_sent_halfway_is_closed_at_the_deadline(node):
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: gateway\r\n" + b"X-Pad: a\r\n" * 20)
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started < 15  # aiohttp's own default was never (or 75 s)


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(node):
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        assert closed_by_server(sock)


def test_a_body_that_does_not_arrive_in_time_answers_408(node):
    head = request("POST", "/webhook", b"", "Content-Length: 900")
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(head + b'{"type": "BASE_')
        status, headers, body = read_answer(sock)
        assert status == 408 and json.loads(body)["status"] == "request_timeout"
        assert headers["content-type"].startswith("application/json")
        assert closed_by_server(sock)


def test_a_declared_terabyte_body_is_refused_at_once(node):
    head = request("POST", "/webhook", b"", f"Content-Length: {10**12}")
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(head + b"{")
        status, _, body = read_answer(sock)
        assert status == 413 and json.loads(body)["status"] == "too_large"
        assert closed_by_server(sock)


def test_connections_over_the_cap_get_503_and_the_webhook_works_again_after(node):
    idle = [socket.create_connection(("127.0.0.1", node.port), timeout=20)]
    try:
        while len(idle) < MAX_CONNECTIONS:
            idle.append(socket.create_connection(("127.0.0.1", node.port), timeout=20))
        # Until the server has accepted them all, one more is still served: ask again.
        deadline = time.monotonic() + 10
        while (answer := exchange(node.port, request("GET", "/health")))[0] == 200:
            assert time.monotonic() < deadline, "the connection cap was never reached"
        status, _, body = answer
        assert status == 503 and json.loads(body)["status"] == "busy"
    finally:
        for sock in idle:
            sock.close()

    def healthy() -> bool:
        return exchange(node.port, request("GET", "/health"))[0] == 200

    deadline = time.monotonic() + 10
    while not healthy():
        assert time.monotonic() < deadline, "the cap did not free up"
        time.sleep(0.05)
    body = json.dumps(signal_body()).encode()
    status, _, answer = exchange(node.port, request("POST", "/webhook", body))
    assert status in (200, 202), answer


# --- protocol errors answer JSON and are not logged as crashes -------------------


@pytest.mark.parametrize(
    ("name", "raw", "status"),
    [
        ("bad method", b"FOO\x01 /webhook HTTP/1.1\r\nHost: g\r\n\r\n", 400),
        ("header line over the limit", request("GET", "/health", b"", "X-Big: " + "a" * 5000), 400),
        (
            "too many headers",
            request("GET", "/health", b"", *(f"X-H{i}: v" for i in range(40))),
            400,
        ),
        (
            "Content-Length and Transfer-Encoding together",
            b"POST /webhook HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
            400,
        ),
        (
            "a body that is not in its Content-Encoding",
            request("POST", "/webhook", b"xxxxsnappy9", "Content-Encoding: gzip"),
            400,
        ),
    ],
)
def test_protocol_errors_answer_json_without_echo_or_traceback(node, name, raw, status):
    before = len(log_records(node))
    got, headers, body = exchange(node.port, raw)
    assert got == status, (name, body)
    assert headers["content-type"].startswith("application/json"), (name, headers)
    answer = json.loads(body)
    assert set(answer) == {"status", "error"}, answer
    assert b"snappy9" not in body and b"aaaa" not in body and b"FOO" not in body
    new = log_records(node)[before:]
    assert not [r for r in new if r.get("level") in ("error", "critical", "raw")], new
    assert not [r for r in new if "exception" in r], new


def test_a_client_gone_mid_body_is_counted_not_logged_as_an_error(node):
    labels = {"listener": "public", "code": "400", "reason": "client_disconnected"}
    counted = metric(node, "gateway_http_rejections_total", **labels)
    before = len(log_records(node))
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(request("POST", "/webhook", b"", "Content-Length: 500") + b'{"type"')
    deadline = time.monotonic() + 10  # the server notices the close on its own time
    while metric(node, "gateway_http_rejections_total", **labels) == counted:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    assert exchange(node.port, request("GET", "/health"))[0] == 200
    new = log_records(node)[before:]
    assert not [r for r in new if r.get("level") in ("error", "critical", "raw")], new


@pytest.mark.parametrize("header", ["X-Signature: sha256=\xe9\xe9", "Authorization: Bearer \xff"])
def test_a_non_ascii_credential_header_is_401_not_500(node, header):
    body = json.dumps(signal_body(secret=None)).encode()
    port, path = (node.port, "/webhook")
    if header.startswith("Authorization"):
        port, path = node.operator_port, "/coordinator/resign"
    status, _, answer = exchange(port, request("POST", path, body, header))
    assert status == 401, answer
    assert not [r for r in log_records(node) if "exception" in r]


# --- refusals are visible, sampled, and never carry the secret --------------------


def test_failed_authentication_is_counted_and_logged_sampled(node):
    before = metric(node, "gateway_http_rejections_total", listener="public", code="401",
                    reason="secret")  # fmt: skip
    lines_before = len(log_records(node))
    wrong = "wrong-secret-3f9c"
    for _ in range(50):
        body = json.dumps(signal_body(secret=wrong)).encode()
        assert exchange(node.port, request("POST", "/webhook", body))[0] == 401
    after = metric(node, "gateway_http_rejections_total", listener="public", code="401",
                   reason="secret")  # fmt: skip
    assert after - before == 50
    logged = [
        r for r in log_records(node)[lines_before:]
        if r.get("event") == "request rejected" and r.get("reason") == "secret"
    ]  # fmt: skip
    assert 1 <= len(logged) <= 2  # sampled: one line per reason per 10 s
    text = node.log_path.read_text()
    assert wrong not in text and SECRET not in text


# --- the public and the operator's surfaces ------------------------------------------


OPERATOR_ROUTES = [
    ("GET", "/signals/1"),
    ("GET", "/metrics"),
    ("GET", "/coordinator/leader"),
    ("POST", "/coordinator/resign"),
    ("GET", "/openapi.yaml"),
    ("GET", "/"),
    ("GET", "/status"),
    ("GET", "/status/snapshot"),
    ("GET", "/status/events"),
]


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_operator_routes_are_404_on_the_public_listener(node, method, path):
    status, _, body = exchange(
        node.port, request(method, path, b"", f"Authorization: Bearer {ADMIN_TOKEN}")
    )
    assert status == 404 and json.loads(body)["status"] == "not_found"


@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_operator_routes_need_the_read_token(node, method, path):
    status, _, _ = exchange(node.operator_port, request(method, path))
    assert status == 401
    wrong = exchange(node.operator_port, request(method, path, b"", "Authorization: Bearer nope"))
    assert wrong[0] == 401


def test_the_read_token_works_as_bearer_or_cookie_and_the_admin_token_reads_too(node):
    for header in (
        f"Authorization: Bearer {OPERATOR_TOKEN}",
        f"Cookie: pgleader_operator_token={OPERATOR_TOKEN}",
        f"Authorization: Bearer {ADMIN_TOKEN}",
    ):
        status, _, body = exchange(
            node.operator_port, request("GET", "/coordinator/leader", b"", header)
        )
        assert status == 200, (header, body)
        assert json.loads(body)["instance_id"] == "surface1"


def test_a_browser_signs_in_to_the_status_page_once_with_the_token_in_a_cookie(node):
    status, _, _ = exchange(node.operator_port, request("GET", "/status?token=nope"))
    assert status == 401
    status, headers, _ = exchange(node.operator_port, request("GET", f"/?token={OPERATOR_TOKEN}"))
    assert (status, headers["location"]) == (303, "/status")
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"pgleader_operator_token={OPERATOR_TOKEN};")
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    # The page itself is read-only and loads nothing from elsewhere.
    status, headers, body = exchange(
        node.operator_port, request("GET", "/status", b"", f"Cookie: {cookie.split(';')[0]}")
    )
    assert status == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert b"http://" not in body and b"https://" not in body  # no external font or script
    assert b"<form" not in body and b"fetch(" not in body  # nothing it could change


def test_resign_still_needs_the_admin_token_beside_the_read_token(node):
    status, _, body = exchange(
        node.operator_port,
        request(
            "POST", "/coordinator/resign", b"", f"Cookie: pgleader_operator_token={OPERATOR_TOKEN}"
        ),
    )
    assert status == 401 and "admin" in json.loads(body)["error"]


async def test_the_allow_list_guards_the_public_listener_not_the_operators(dsn, tmp_path):
    gw = GatewayProcess(dsn, "fenced1", tmp_path, "--allowed-ips", "10.9.8.0/24")
    await gw.start()
    try:
        body = json.dumps(signal_body()).encode()
        for raw in (request("POST", "/webhook", body), request("GET", "/health")):
            status, _, answer = await asyncio.to_thread(exchange, gw.port, raw)
            assert status == 403 and json.loads(answer)["status"] == "forbidden"
        status, _, _ = await asyncio.to_thread(
            exchange, gw.operator_port, request("GET", "/health")
        )
        assert status == 200
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute("select count(*) from gateway.signals")
            assert (await cur.fetchone()) == (0,)
    finally:
        await gw.stop()


async def test_the_operator_port_defaults_to_the_public_port_plus_1000(dsn, tmp_path):
    port = free_port()
    while port + 1000 > 65535 or not _free(port + 1000):
        port = free_port()
    gw = GatewayProcess(dsn, "defaults1", tmp_path)
    gw.port, gw.operator_port = port, port + 1000
    gw.args = []
    await gw.start()
    try:
        status, _, body = await asyncio.to_thread(
            exchange, port + 1000, request("GET", "/coordinator/leader")
        )
        assert status == 200 and json.loads(body)["instance_id"] == "defaults1"
    finally:
        await gw.stop()


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --- start-up ------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["--port", "--operator-port"])
def test_serve_on_a_port_in_use_fails_in_one_line_before_joining_the_election(
    empty_database_dsn, tmp_path, which
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--operator-port": str(free_port())}
        ports[which] = str(busy)
        result = subprocess.run(
            [sys.executable, "-m", "pgleader", "serve", "--dsn", empty_database_dsn,
             "--webhook-secret", SECRET, "--data-dir", str(tmp_path),
             *(arg for flag, value in ports.items() for arg in (flag, value))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{busy}" in lines[0] and "in use" in lines[0]
    with psycopg.connect(empty_database_dsn) as conn:  # neither migrated nor elected
        assert conn.execute("select to_regnamespace('pgleader')").fetchone() == (None,)
