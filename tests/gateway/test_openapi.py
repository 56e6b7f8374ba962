"""service/openapi.yaml tells the truth about the HTTP surface.

The document parses, describes exactly the routes the aiohttp router has, is served
at GET /openapi.yaml, and a live `pgleader serve` answers schemathesis-generated
requests without a server error and with the status codes, content types and JSON
shapes the document promises.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_asyncio
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from service.config import ServiceConfig
from service.gateway import Gateway
from service.web.listener import Limits, Rejections
from service.web.routes import OPENAPI_PATH, build_operator_app, build_public_app
from tests.support.database import cloned_database
from tests.support.gateway import PUBLIC_PATHS, GatewayProcess, signal_body, until

SPEC: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text())
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
OPERATIONS = sorted(
    (method, path) for path, item in SPEC["paths"].items() for method in item if method in METHODS
)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


# --- the document itself ------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references: {ref}"
    node: Any = SPEC
    for part in ref[2:].split("/"):
        assert part in node, f"dangling reference {ref}"
        node = node[part]
    return node


def test_the_document_parses_and_every_reference_resolves():
    assert str(SPEC["openapi"]).startswith("3.")
    assert SPEC["info"]["title"] and SPEC["info"]["version"]
    for ref in _refs(SPEC):
        _resolve(ref)
    for method, path in OPERATIONS:
        assert method in METHODS, (method, path)
        operation = SPEC["paths"][path][method]
        assert operation.get("operationId") and operation.get("summary"), (method, path)
        assert operation["responses"], (method, path)


def test_every_error_answer_has_the_documented_json_shape():
    """{status, error, field?} for every 4xx/5xx but /ready's 503, which is {status}."""
    error = SPEC["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"status", "error"}
    assert set(error["properties"]) == {"status", "error", "field"}
    for method, path in OPERATIONS:
        for code, response in SPEC["paths"][path][method]["responses"].items():
            if int(code) < 400:
                continue
            response = _resolve(response["$ref"]) if "$ref" in response else response
            schema = response["content"]["application/json"]["schema"]
            ref = schema.get("$ref", "")
            ready_503 = (path, code) == ("/ready", "503")
            expected = ("Readiness",) if ready_503 else ("Error", "Invalid")
            assert ref.rsplit("/", 1)[-1] in expected, (method, path, code, ref)


def _routes(app: Any) -> set[tuple[str, str]]:
    routes = set()
    for resource in app.router.resources():
        info = resource.get_info()
        path = info.get("path") or info["formatter"]
        methods = {route.method.lower() for route in resource}
        # aiohttp answers HEAD on every GET route by itself; HEAD is implied by GET.
        if "get" in methods:
            methods.discard("head")
        routes |= {(method, path) for method in methods}
    return routes


async def test_every_route_is_documented_on_its_listener_and_nothing_else(tmp_path):
    dsn = "host=127.0.0.1 dbname=unused"  # the apps are only built, never started
    gateway = Gateway(ServiceConfig(dsn=dsn, webhook_secret="x", data_dir=tmp_path), dsn)
    limits, rejections = Limits(8, 1.0, 16384), Rejections()
    public = _routes(build_public_app(gateway, limits, rejections))
    operator = _routes(build_operator_app(gateway, limits, rejections))
    assert public | operator == set(OPERATIONS)
    for method, path in OPERATIONS:
        on_operator = "servers" in SPEC["paths"][path]  # the operator's listener says so
        assert (method, path) in (operator if on_operator else public), (method, path)
        if not on_operator:
            assert path in PUBLIC_PATHS


# --- a live instance ----------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi_dsn(pg_template: Any) -> Iterator[str]:
    """A database of this module's own, cloned from the migrated template."""
    with cloned_database(pg_template, "pgleader_openapi") as dsn:
        yield dsn


def base_url(node: GatewayProcess, path: str) -> str:
    """The listener that serves `path` (a template like /signals/{signal_id} included)."""
    public = path in PUBLIC_PATHS or path in ("/nope",)
    return node.url if public else node.operator_url


def request(
    node: GatewayProcess, method: str, path: str, body: bytes | None = None
) -> tuple[int, str, bytes]:
    port = node.port if base_url(node, path) == node.url else node.operator_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(openapi_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """One leading instance with signal 1 executed, so GET /signals/1 has something to show."""
    gw = GatewayProcess(openapi_dsn, "api1", Path(tmp_path_factory.mktemp("openapi")))
    await gw.start()
    try:

        async def leads() -> bool:
            return bool(json.loads(request(gw, "GET", "/coordinator/leader")[2])["is_leader"])

        await until(leads, timeout=15)
        status, _, raw = request(gw, "POST", "/webhook", json.dumps(signal_body()).encode())
        assert (status, json.loads(raw)) == (200, {"status": "executed", "signal_id": 1})
        yield gw
    finally:
        await gw.stop()


def test_the_document_is_served_at_openapi_yaml(node):
    status, content_type, raw = request(node, "GET", "/openapi.yaml")
    assert status == 200 and content_type.startswith("application/yaml")
    assert raw == OPENAPI_PATH.read_bytes()


@pytest.fixture(scope="module")
def api_schema(node: GatewayProcess) -> Any:
    """The document as the live instance serves it (requests go to node.url, not `servers`)."""
    return schemathesis.openapi.from_url(f"{node.operator_url}/openapi.yaml")


# Examples per operation and mode: enough for every documented answer of this surface
# to show up at least once, small enough for the module to stay within seconds.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# An event stream never ends: its first event is checked below instead of fuzzed.
STREAMS = {("get", "/status/events")}


@pytest.mark.parametrize(("method", "path"), [op for op in OPERATIONS if op not in STREAMS])
def test_live_answers_conform_to_the_document(api_schema, node, method, path):
    operation = api_schema[path][method.upper()]
    modes = [GenerationMode.POSITIVE]
    if "requestBody" in SPEC["paths"][path][method]:
        modes.append(GenerationMode.NEGATIVE)  # bodies that break the schema: still no 5xx
    for mode in modes:

        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode))
        def conforms(case: Any) -> None:
            case.call_and_validate(base_url=base_url(node, path), checks=CHECKS, timeout=10)

        conforms()


def test_the_status_stream_starts_with_a_snapshot_as_documented(node):
    assert set(OPERATIONS) >= STREAMS
    conn = http.client.HTTPConnection("127.0.0.1", node.operator_port, timeout=10)
    try:
        conn.request("GET", "/status/events")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        lines = [resp.readline() for _ in range(4)]
    finally:
        conn.close()
    assert lines[:3] == [b"retry: 2000\n", b"\n", b"event: snapshot\n"]
    snapshot = json.loads(lines[3].removeprefix(b"data: "))
    assert snapshot["served_by"] == "api1" and snapshot["election"]["leader"] == "api1"
    assert [s["id"] for s in snapshot["signals"]] == [1]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/signals/1", 200),  # the documented 200 shape, with an order
        ("/signals/999999", 404),
        ("/signals/abc", 400),
        ("/signals/-1", 400),
        ("/signals/1234567890123456789", 400),  # 19 digits: refused before int()
        ("/signals/%C2%B2", 400),  # "²": str.isdigit() is true, int() refuses it -> 500 today
        ("/signals/%E2%91%A0", 400),  # "①": likewise
    ],
)
def test_signal_lookups_answer_as_documented(api_schema, node, path, status):
    operation = api_schema["/signals/{signal_id}"]["GET"]
    raw_id = unquote(path.rsplit("/", 1)[-1])
    case = operation.Case(path_parameters={"signal_id": raw_id})
    got, _, body = request(node, "GET", path)
    assert got == status, body
    response = case.call(base_url=node.operator_url, timeout=10)
    case.validate_response(response, checks=CHECKS)


def test_unknown_paths_and_methods_answer_json_errors(node):
    for method, path, status in [
        ("GET", "/nope", 404),
        ("GET", "/webhook", 405),
        ("DELETE", "/health", 405),
        ("PUT", "/signals/1", 405),
    ]:
        got, content_type, raw = request(node, method, path)
        assert got == status and content_type.startswith("application/json"), raw
        answer = json.loads(raw)
        assert set(answer) == {"status", "error"} and all(
            isinstance(v, str) for v in answer.values()
        )
