"""Secrets stay secret, admin is off unless configured, SQL is parameterised, and the
gateway runs under a least-privilege role (sql/roles.sql) that cannot drop its tables
nor change a row but through the schema's functions.

Everything runs against real `pgleader serve` processes and the suite's PostgreSQL.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import hmac
import inspect
import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import make_conninfo
from psycopg_pool import AsyncConnectionPool

import pgleader.queries
import service.queries
import service.web.auth
import service.web.listener
import service.web.routes
from pgleader import Elector, Fenced, Timings, check_epoch
from pgleader.embedded import find_bindir
from pgleader.fencing import FENCED_SQLSTATE
from service.brokers.paper import PaperBroker
from service.errors import BrokerUnavailable
from service.execution.executor import Executor
from tests.support.gateway import PUBLIC_PATHS, Cluster, GatewayProcess, cluster, signal_body, until

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "wh-secret-Q7v9ZpL2"
ADMIN_TOKEN = "adm-token-K3m8RtX5"
DSN_PASSWORD = "dsn-pass-XYZ-4c1e"
ROLE = "pgleader_gateway"
ROLE_PASSWORD = "role-pass-8d2b"


def hmac_header(raw: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()


@pytest.fixture
async def gw(dsn: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async with cluster(dsn, tmp_path) as c:
        yield c


async def start(gw: Cluster, name: str, dsn: str, *args: str) -> GatewayProcess:
    node = GatewayProcess(dsn, name, gw.data_dir, *args)
    gw.nodes[name] = node
    await node.start()
    return node


async def leader_other_than(gw: Cluster, old: GatewayProcess) -> GatewayProcess:
    """The leader by the database once it is no longer `old` (bounded wait)."""

    async def moved() -> bool:
        name = await gw.scalar("select leader from pgleader.leader where election = 'gateway'")
        return name is not None and name != old.instance_id

    await until(moved, timeout=20)
    return await gw.leader()


async def call(
    gw: Cluster, method: str, url: str, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    async with gw.http.request(method, url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# --- secrets never leave the process ------------------------------------------------


async def test_secrets_never_appear_in_logs_or_answers(gw, dsn):
    """Every path is driven with a distinctive webhook secret, admin token and DSN
    password; none of them may show in any answer or anywhere in the instance's log."""
    with_password = make_conninfo(dsn, password=DSN_PASSWORD)  # trust auth: accepted
    node = await start(
        gw, "sec1", with_password, "--webhook-secret", WEBHOOK_SECRET, "--admin-token", ADMIN_TOKEN
    )
    await gw.leader()
    answers: list[tuple[str, int, dict[str, str], bytes]] = []

    async def drive(label: str, method: str, path: str, **kwargs: Any) -> int:
        url = node.url if path in PUBLIC_PATHS | {"/nope"} else node.operator_url
        status, headers, body = await call(gw, method, url + path, **kwargs)
        answers.append((label, status, headers, body))
        return status

    def body(**fields: Any) -> bytes:
        return json.dumps(signal_body(**fields)).encode()

    signed, valid = body(secret=None), body(secret=WEBHOOK_SECRET)
    expected = [
        ("valid", "POST", "/webhook", {"data": valid}, 200),
        ("duplicate", "POST", "/webhook", {"data": valid}, 200),
        ("hmac", "POST", "/webhook", {"data": signed, "headers": {"X-Signature": hmac_header(signed)}}, 200),
        ("wrong secret", "POST", "/webhook", {"data": body(secret=WEBHOOK_SECRET[:-1])}, 401),
        ("wrong hmac", "POST", "/webhook", {"data": signed, "headers": {"X-Signature": hmac_header(signed, "x")}}, 401),
        ("hmac + secret", "POST", "/webhook", {"data": body(secret=WEBHOOK_SECRET), "headers": {"X-Signature": "sha256=00"}}, 401),
        ("bad field", "POST", "/webhook", {"data": body(secret=WEBHOOK_SECRET, lots="5")}, 400),
        ("bad json", "POST", "/webhook", {"data": f'{{"secret": "{WEBHOOK_SECRET}", '.encode()}, 401),
        ("form", "POST", "/webhook", {"data": f"secret={WEBHOOK_SECRET}&type=EXIT".encode()}, 401),
        ("secret elsewhere", "POST", "/webhook", {"data": body(secret="x", position=WEBHOOK_SECRET)}, 401),
        ("duplicate key", "POST", "/webhook", {"data": body(secret=WEBHOOK_SECRET)[:-1] + f', "secret": "{WEBHOOK_SECRET}"}}'.encode()}, 400),
        ("too large", "POST", "/webhook", {"data": body(secret=WEBHOOK_SECRET, pad="x" * 20_000)}, 413),
        ("leader", "GET", "/coordinator/leader", {}, 200),
        ("metrics", "GET", "/metrics", {}, 200),
        ("signal", "GET", "/signals/1", {}, 200),
        ("signal 400", "GET", "/signals/x", {}, 400),
        ("signal 404", "GET", "/signals/424242", {}, 404),
        ("ready", "GET", "/ready", {}, 200),
        ("health", "GET", "/health", {}, 200),
        ("openapi", "GET", "/openapi.yaml", {}, 200),
        ("unknown", "GET", "/nope", {}, 404),
        ("resign no token", "POST", "/coordinator/resign", {}, 401),
        ("resign wrong token", "POST", "/coordinator/resign", {"headers": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}}, 401),
        ("resign basic", "POST", "/coordinator/resign", {"headers": {"Authorization": f"Basic {ADMIN_TOKEN}"}}, 401),
        ("resign", "POST", "/coordinator/resign", {"headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}, 200),
    ]  # fmt: skip
    for label, method, path, kwargs, status in expected:
        assert await drive(label, method, path, **kwargs) == status, answers[-1]
    await gw.leader()  # the only instance campaigns again after resigning
    # Connection errors are logged with their messages: cut every session of the instance.
    await gw.query(
        "select pg_terminate_backend(pid) from pg_stat_activity"
        " where datname = current_database() and application_name like %s",
        f"%{node.instance_id}",
    )
    await gw.leader()
    assert await drive("after the cut", "POST", "/webhook", data=body(secret=WEBHOOK_SECRET)) < 300
    await drive("leader again", "GET", "/coordinator/leader")
    await node.stop()  # the shutdown path logs too

    log = node.log_path.read_text()
    assert "leadership resigned" in log and "admin request" in log  # the log was written
    for name, secret in [
        ("webhook secret", WEBHOOK_SECRET),
        ("admin token", ADMIN_TOKEN),
        ("DSN password", DSN_PASSWORD),
    ]:
        assert secret not in log, f"{name} in the log of {node.instance_id}"
        for label, status, headers, raw in answers:
            assert secret.encode() not in raw, (name, label, status)
            assert secret not in json.dumps(headers), (name, label, status)
    spool = node.data_dir / "spool"
    for path in spool.glob("*") if spool.exists() else []:
        assert WEBHOOK_SECRET not in path.read_text(), path


def _dsn_variants(dsn: str) -> list[str]:
    params = {k: v for k, v in (part.split("=", 1) for part in dsn.split())}
    host, port, user = params["host"], params["port"], params["user"]
    return [
        make_conninfo(dsn, dbname="no_such_db", password=DSN_PASSWORD),
        make_conninfo(dsn, user="no_such_role", password=DSN_PASSWORD),
        f"postgresql://{user}:{DSN_PASSWORD}@{host}:{port}/no_such_db",
        f"postgresql://{user}:{DSN_PASSWORD}@{host}:notaport/no_such_db",
        f"{dsn} password={DSN_PASSWORD} no_such_option=1",
        f"{dsn} password='{DSN_PASSWORD}",  # unterminated quote
    ]


@pytest.mark.parametrize(
    "variant",
    [0, 1, 2, 3, 4, 5],
    ids=["no-db", "no-role", "url", "url-bad-port", "bad-option", "bad-quote"],
)
def test_start_up_failures_never_print_the_dsn_password(dsn, tmp_path, variant):
    """A DSN that cannot work fails at once, with a message that names it without the password."""
    bad_dsn = _dsn_variants(dsn)[variant]
    command = [
        sys.executable, "-m", "pgleader", "serve", "--dsn", bad_dsn, "--port", "1",
        "--data-dir", str(tmp_path), "--webhook-secret", WEBHOOK_SECRET,
        "--admin-token", ADMIN_TOKEN, "--log-format", "json",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        output, returncode = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as exc:
        output, returncode = _text(exc.stdout) + _text(exc.stderr), None
    for secret in (DSN_PASSWORD, WEBHOOK_SECRET, ADMIN_TOKEN):
        assert secret not in output, output
    if returncode is None:
        raise TimeoutError(f"pgleader serve still retrying after 10 s: {output[-500:]}")
    assert returncode != 0 and "error" in output, output


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


async def test_admin_endpoints_are_off_without_a_token_and_need_the_right_one(gw, dsn):
    off = await start(gw, "off1", dsn, "--admin-token", "")  # overrides PGLEADER_ADMIN_TOKEN
    on = await start(gw, "on1", dsn, "--admin-token", ADMIN_TOKEN)
    await gw.leader()
    url = f"{off.operator_url}/coordinator/resign"
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        status, _, raw = await call(gw, "POST", url, headers=headers)
        assert (status, json.loads(raw)["status"]) == (403, "forbidden"), raw
    url = f"{on.operator_url}/coordinator/resign"
    for authorization in (
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {ADMIN_TOKEN.upper()}",
        f"Basic {ADMIN_TOKEN}",
        f"Token {ADMIN_TOKEN}",
        ADMIN_TOKEN,
        f"Bearer é{ADMIN_TOKEN}",  # non-ASCII: compared as bytes, never a TypeError
    ):
        headers = {} if authorization is None else {"Authorization": authorization}
        status, _, raw = await call(gw, "POST", url, headers=headers)
        assert (status, json.loads(raw)["status"]) == (401, "unauthorized"), (authorization, raw)
    assert {n.instance_id for n in gw.nodes.values()} == {"off1", "on1"}


def test_secret_checks_are_constant_time():
    """The comparisons go through hmac.compare_digest (on bytes, so non-ASCII input
    cannot raise), and no secret-like value is compared with == / != / in."""
    for check in (service.web.auth.secret_ok, service.web.auth.signature_ok):
        assert "compare_digest" in check.__code__.co_names, check.__name__
    for check in (service.web.auth.admin_ok, service.web.auth.body_secret_ok):
        assert "secret_ok" in check.__code__.co_names, check.__name__
    assert service.web.auth.secret_ok("é-secret", "é-secret") and not service.web.auth.secret_ok(
        "é", "e"
    )
    assert not service.web.auth.signature_ok(b"{}", "sha256=é", "secret")
    secretish = ("secret", "token", "signature", "digest", "password", "expected", "given")
    for module in (service.web.auth, service.web.routes, service.web.listener):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
                continue
            names = {
                getattr(n, "id", None) or getattr(n, "attr", None)
                for side in (node.left, *node.comparators)
                for n in ast.walk(side)
            }
            leaky = {n for n in names if n and any(word in n.lower() for word in secretish)}
            assert not leaky, f"{module.__name__}:{node.lineno} compares {leaky} with =="


# --- every SQL statement is parameterised ------------------------------------------


def _built_string(node: ast.expr) -> str | None:
    """How `node` builds a string from pieces, or None when it does not."""
    if isinstance(node, ast.JoinedStr):
        return "an f-string"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
        return "% or + on strings"
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and not _is_sql_composable(node.func.value)
    ):
        return "str.format"
    return None


def _is_sql_composable(node: ast.expr) -> bool:
    """psycopg.sql.SQL(...) / sql.SQL(...) / SQL(...): composition quotes what it inserts."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("SQL", "Composed")


def unparameterised_sql(source: str, filename: str) -> list[str]:
    """file:line of every execute() whose statement is built from strings (directly, via
    a name assigned such a value, or inside sql.SQL(...))."""
    tree = ast.parse(source, filename)
    built_names: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if _built_string(node.value):
                for target in targets:
                    if isinstance(target, ast.Name):
                        built_names[target.id] = node.lineno
    found = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany")
            and node.args
        ):
            continue
        statement = node.args[0]
        how = _built_string(statement)
        if how is None and isinstance(statement, ast.Name) and statement.id in built_names:
            how = f"{statement.id}, built at line {built_names[statement.id]}"
        if how is None and _is_sql_composable(statement) and statement.args:  # type: ignore[attr-defined]
            how = _built_string(statement.args[0])  # type: ignore[attr-defined]
            how = how and f"sql.SQL() of {how}"
        if how is not None:
            found.append(f"{filename}:{node.lineno}: statement is {how}")
    return found


def test_the_sql_scanner_recognises_string_building():
    bad = textwrap.dedent(
        """
        async def f(conn, sql, name, q):
            await conn.execute(f"select * from t where a = '{name}'")
            await conn.execute("select * from t where a = '%s'" % name)
            await conn.execute("select * from " + name)
            await conn.execute("select {}".format(name))
            stmt = f"delete from {name}"
            await conn.execute(stmt)
            await conn.execute(sql.SQL(f"drop table {name}"))
            cur.executemany("insert into t values (%s)" % name, [])
        """
    )
    good = textwrap.dedent(
        """
        Q = "select 1 from t where a = %s"
        async def f(conn, sql, name):
            await conn.execute(Q, [name])
            await conn.execute("select * from t where a = %s", [name])
            await conn.execute(sql.SQL("listen {}").format(sql.Identifier(name)))
            await conn.execute(m.sql.encode())
        """
    )
    lines = {int(found.split(":")[1]) for found in unparameterised_sql(bad, "bad.py")}
    assert lines == {3, 4, 5, 6, 8, 9, 10}
    assert unparameterised_sql(good, "good.py") == []


def test_every_sql_statement_is_parameterised():
    files = sorted([*(ROOT / "pgleader").rglob("*.py"), *(ROOT / "service").rglob("*.py"),
                    *(ROOT / "bench").rglob("*.py")])  # fmt: skip
    assert len(files) > 10
    found = [
        problem
        for path in files
        for problem in unparameterised_sql(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "\n".join(found)


# --- every named query is run as a statement, with parameters -------------------------

# Where code gets named queries from: module -> the queries file it loads.
QUERY_SOURCES = {"pgleader.queries": "pgleader", "service.queries": "gateway"}
QUERY_FILES = {"pgleader": pgleader.queries.QUERIES, "gateway": service.queries.QUERIES}
QUERY_LOADERS = {"pgleader/queries.py", "service/queries.py"}
_PLACEHOLDER = re.compile(r"%(\([A-Za-z_][A-Za-z0-9_]*\))?s")


@dataclass(frozen=True)
class QueryUse:
    """`stream`'s query `name` run at `where`, with parameters or without."""

    stream: str
    name: str
    where: str
    with_params: bool


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def _statement_of(call: ast.AST | None, node: ast.AST) -> bool | None:
    """Whether `call` runs `node` as its statement: None if it does not, else whether
    it passes parameters."""
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr in ("execute", "executemany")
        and call.args
        and call.args[0] is node
    ):
        return None
    return len(call.args) > 1 or any(k.arg == "params" for k in call.keywords)


def named_query_uses(source: str, filename: str) -> tuple[list[QueryUse], list[str]]:
    """Every use of a named query in a module, and every way it is misused.

    A query is looked up with a literal name (``QUERIES["claim_signals"]``), and its
    text goes, untouched, to ``execute()`` as the statement: directly, or through a
    name bound to it and used for nothing else. So no Python string operation (%,
    +, .format, f-string, sql.SQL) ever touches a query's text: its values can
    only be parameters."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    streams: dict[str, str] = {}  # local name -> the queries file it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in QUERY_SOURCES:
            for alias in node.names:
                if alias.name == "QUERIES":
                    streams[alias.asname or alias.name] = QUERY_SOURCES[node.module]
    for module, stream in QUERY_SOURCES.items():
        streams[f"{module}.QUERIES"] = stream
    uses: list[QueryUse] = []
    problems: list[str] = []
    bound: dict[str, tuple[str, str, int]] = {}  # name -> (stream, query, line bound)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and filename not in QUERY_LOADERS
            and (_dotted(node.func) or "").rsplit(".", 1)[-1] in ("load_queries", "parse_queries")
        ):
            problems.append(f"{filename}:{node.lineno}: queries loaded outside the loaders")
        if not isinstance(node, ast.Name | ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        stream = streams.get(_dotted(node) or "")
        if stream is None or isinstance(parents.get(node), ast.Attribute):
            continue
        where = f"{filename}:{node.lineno}"
        lookup = parents.get(node)
        if not (
            isinstance(lookup, ast.Subscript)
            and lookup.value is node
            and isinstance(lookup.slice, ast.Constant)
            and isinstance(lookup.slice.value, str)
        ):
            problems.append(f"{where}: queries must be looked up by a literal name")
            continue
        name = lookup.slice.value
        user = parents.get(lookup)
        with_params = _statement_of(user, lookup)
        if with_params is not None:
            uses.append(QueryUse(stream, name, where, with_params))
        elif (
            isinstance(user, ast.Assign)
            and len(user.targets) == 1
            and isinstance(user.targets[0], ast.Name)
        ):
            bound[user.targets[0].id] = (stream, name, user.lineno)
        else:
            problems.append(f"{where}: query {name!r} is not a statement of execute()")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Name) and node.id in bound and isinstance(node.ctx, ast.Load)):
            continue
        stream, name, line = bound[node.id]
        where = f"{filename}:{node.lineno}"
        with_params = _statement_of(parents.get(node), node)
        if with_params is None:
            problems.append(
                f"{where}: {node.id} (query {name!r}, line {line}) used other than as the"
                " statement of execute()"
            )
        else:
            uses.append(QueryUse(stream, name, where, with_params))
    for name, (_, query, line) in bound.items():
        if not any(u.name == query and u.where.startswith(f"{filename}:") for u in uses):
            problems.append(f"{filename}:{line}: {name} (query {query!r}) is never executed")
    return uses, problems


def test_the_query_scanner_recognises_misuse():
    bad = textwrap.dedent(
        """
        from pgleader.queries import QUERIES
        from service.queries import QUERIES as GATEWAY
        _Q = QUERIES["heartbeat"]
        async def f(conn, name, sql):
            await conn.execute(QUERIES["heartbeat"] % name)
            await conn.execute(f"{QUERIES['heartbeat']} where {name}")
            await conn.execute(GATEWAY["get_signal"].format(name))
            await conn.execute(sql.SQL(_Q))
            await conn.execute(QUERIES[name], [name])
            text = QUERIES["resign"] + name
            await conn.execute(text)
            queries = load_queries(name)
        """
    )
    good = textwrap.dedent(
        """
        import service.queries
        from pgleader.queries import QUERIES
        from service.queries import QUERIES as GATEWAY
        _Q = QUERIES["heartbeat"]
        async def f(conn, name):
            await conn.execute(_Q, [name])
            await conn.execute(GATEWAY["get_signal"], params=[name])
            await cur.executemany(service.queries.QUERIES["notify_signal"], [[name]])
            await conn.execute(QUERIES["ping"])
        """
    )
    uses, problems = named_query_uses(bad, "bad.py")
    lines = {int(problem.split(":")[1]) for problem in problems}
    assert lines == {4, 6, 7, 8, 9, 10, 11, 13}, problems
    uses, problems = named_query_uses(good, "good.py")
    assert problems == []
    assert sorted((u.stream, u.name, u.with_params) for u in uses) == [
        ("gateway", "get_signal", True),
        ("gateway", "notify_signal", True),
        ("pgleader", "heartbeat", True),
        ("pgleader", "ping", False),
    ]


def test_every_named_query_exists_is_used_and_gets_its_parameters():
    """Every name the code asks for is in its file, every query of a file is run by the
    library or the gateway (an unused one is dead code), and each run passes
    parameters exactly when the statement has placeholders."""
    uses: list[QueryUse] = []
    problems: list[str] = []
    for path in sorted([*(ROOT / "pgleader").rglob("*.py"), *(ROOT / "service").rglob("*.py"),
                        *(ROOT / "bench").rglob("*.py")]):  # fmt: skip
        found, wrong = named_query_uses(path.read_text(), str(path.relative_to(ROOT)))
        uses += found
        problems += wrong
    assert not problems, "\n".join(problems)
    for stream in QUERY_SOURCES.values():
        queries = QUERY_FILES[stream]
        asked = {u.name for u in uses if u.stream == stream}
        run = {u.name for u in uses if u.stream == stream and not u.where.startswith("bench/")}
        assert asked <= set(queries), f"not in {queries.source}: {sorted(asked - set(queries))}"
        assert set(queries) <= run, f"never run, dead: {sorted(set(queries) - run)}"
    for use in uses:
        text = QUERY_FILES[use.stream][use.name]
        placeholders = _PLACEHOLDER.findall(text.replace("%%", ""))
        assert use.with_params == bool(placeholders), (
            f"{use.where}: {use.name!r} has {len(placeholders)} placeholders, run "
            + ("with" if use.with_params else "without")
            + " parameters"
        )


def test_no_module_borrows_another_ones_statement():
    """A statement is shared by its name in the queries file, not by importing the
    private constant another module bound it to (as the benchmarks once did)."""
    bound: dict[str, set[str]] = {}
    paths = sorted([*(ROOT / "pgleader").rglob("*.py"), *(ROOT / "service").rglob("*.py"),
                    *(ROOT / "bench").rglob("*.py")])  # fmt: skip
    for path in paths:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Subscript):
                looked_up = _dotted(node.value.value) or ""
                if looked_up == "QUERIES" or looked_up.endswith(".queries.QUERIES"):
                    bound.setdefault(module, set()).update(
                        t.id for t in node.targets if isinstance(t, ast.Name)
                    )
    borrowed = [
        f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name} from {node.module}"
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module in bound
        for alias in node.names
        if alias.name in bound[node.module]
    ]
    assert not borrowed, "\n".join(borrowed)


# --- the least-privilege role -------------------------------------------------------


def run_roles_sql(dsn: str) -> subprocess.CompletedProcess[str]:
    """What an operator runs: psql -v gateway_password=... -f sql/roles.sql."""
    return subprocess.run(
        [
            str(find_bindir() / "psql"), dsn, "-X", "-q",
            "-v", f"gateway_password={ROLE_PASSWORD}", "-f", str(ROOT / "sql" / "roles.sql"),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture
def role_dsn(dsn: str) -> Iterator[str]:
    """This test's database with sql/roles.sql applied (twice: it is idempotent), and a
    DSN that logs in as the role. Roles are cluster-wide: it may exist already."""
    for _ in range(2):
        result = run_roles_sql(dsn)
        assert result.returncode == 0, result.stderr
    yield make_conninfo(dsn, user=ROLE, password=ROLE_PASSWORD)


async def test_the_gateway_runs_as_the_least_privilege_role(gw, dsn, role_dsn):
    a = await start(gw, "role1", role_dsn, "--no-migrate")
    b = await start(gw, "role2", role_dsn, "--no-migrate")
    first = await gw.leader()
    follower = b if first is a else a
    sessions = await gw.scalar(
        "select count(*) from pg_stat_activity where usename = %s and datname = current_database()",
        ROLE,
    )
    assert sessions >= 4  # each instance: lock session, pool, listener
    status, answer = await gw.post(first, signal_body())
    assert (status, answer["status"]) == (200, "executed"), answer
    status, answer = await gw.post(follower, signal_body())
    assert (status, answer["status"]) == (202, "accepted"), answer
    assert await gw.settled([answer["signal_id"]]) == {answer["signal_id"]: "executed"}

    # A hung leader is evicted with pg_terminate_backend, as the same role.
    first.signal(signal.SIGSTOP)
    try:
        second = await leader_other_than(gw, first)
        assert second is follower
        reason = await gw.scalar(
            "select release_reason from pgleader.leadership_history"
            " where instance_id = %s order by epoch desc limit 1",
            first.instance_id,
        )
        assert reason == "evicted"
        status, answer = await gw.post(second, signal_body())
        assert (status, answer["status"]) == (200, "executed"), answer
    finally:
        first.signal(signal.SIGCONT)

    # A crashed leader: the woken one takes over.
    second.signal(signal.SIGKILL)
    third = await leader_other_than(gw, second)
    assert third is first
    status, answer = await gw.post(third, signal_body())
    assert (status, answer["status"]) == (200, "executed"), answer
    assert set((await gw.broker_requests_per_signal()).values()) == {1}
    ready = await call(gw, "GET", f"{third.url}/ready")
    assert ready[0] == 200, ready

    rows = await gw.query(
        "select rolsuper, pg_has_role(%s, 'pg_signal_backend', 'MEMBER')"
        " from pg_roles where rolname = %s",
        ROLE,
        ROLE,
    )
    assert rows == [(False, False)]


@pytest.mark.parametrize(
    "statement",
    [
        "drop table gateway.signals",
        "truncate gateway.signals",
        "truncate gateway.paper_broker_requests",
        "delete from gateway.signals",
        "delete from pgleader.leadership_history",
        "alter table gateway.orders add column x int",
        "create table gateway.evil (x int)",
        "update pgleader.schema_migrations set checksum = 'x'",
        "drop function gateway.claim_instrument(text, bigint, text, text, interval, jsonb,"
        " interval, text, text)",
        "create schema evil",
        f"alter role {ROLE} superuser",
        "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'postgres' and datname = current_database()",
    ],
)
def test_the_role_cannot_destroy_or_change_the_schema(role_dsn, statement):
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)  # type: ignore[arg-type]
        assert conn.execute("select count(*) from gateway.signals").fetchone() == (0,)


async def test_the_role_can_start_serve_with_migrations_already_applied(gw, role_dsn):
    await start(gw, "role-migrate", role_dsn)


def test_roles_sql_refuses_a_role_that_owns_the_tables(dsn):
    """Run as the owner with gateway_role set to that owner: least privilege is void."""
    with psycopg.connect(dsn) as conn:
        owner = conn.info.user
    result = subprocess.run(
        [str(find_bindir() / "psql"), dsn, "-X", "-q", "-v", f"gateway_role={owner}", "-f",
         str(ROOT / "sql" / "roles.sql")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "superuser" in result.stderr or "owns" in result.stderr, result.stderr


async def test_evicting_needs_no_pg_signal_backend(role_dsn):
    """pg_terminate_backend works on a session of the same role without superuser."""
    async with await psycopg.AsyncConnection.connect(role_dsn, autocommit=True) as victim:
        pid = victim.info.backend_pid
        async with await psycopg.AsyncConnection.connect(role_dsn, autocommit=True) as killer:
            cur = await killer.execute("select pg_terminate_backend(%s)", [pid])
            assert await cur.fetchone() == (True,)

        async def gone() -> bool:
            try:
                await victim.execute("select 1")
            except psycopg.OperationalError:
                return True
            return False

        await until(gone, timeout=5)


# --- the role changes rows only through the functions --------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "update pgleader.election set epoch = epoch + 1",
        "insert into pgleader.election (name) values ('mine')",
        "select epoch from pgleader.election for share",  # the fence: pgleader.current_epoch
        "update pgleader.instances set is_leader = true",
        "update pgleader.leadership_history set release_reason = 'forged'",
        "update gateway.signals set status = 'executed'",
        "update gateway.orders set outcome = 'filled'",
        "update gateway.positions set lots = 0",
        "insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id,"
        " action, quantity) values (1, 1, 'me', 'paper', 'forged', 'BUY', 1)",
        "insert into gateway.positions (instrument, position, is_base_position, lots)"
        " values ('NIFTY', 'Long_1', true, 1)",
        "insert into gateway.alerts (kind) values ('forged')",
        # a function that is not SECURITY DEFINER runs with the role's own rights
        "select * from gateway.claim_instrument('NIFTY', 1, 'me', 'paper', '1 hour', null,"
        " '0 s', 'running', 'wait')",
        "update gateway.trading_halt set mode = 'running'",
        "insert into gateway.reconciliations (requested_by, trigger) values ('me', 'cli')",
        "insert into gateway.instance_settings values ('gateway', 'me', 'x')",
    ],
)
def test_the_role_cannot_write_directly_what_the_functions_change(role_dsn, statement):
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)  # type: ignore[arg-type]


def test_the_role_may_insert_signals_and_broker_requests_and_write_nothing_else(dsn, role_dsn):
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select c.oid::regclass::text, p.privilege"
            "  from pg_class c join pg_namespace n on n.oid = c.relnamespace"
            "  cross join unnest(array['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p (privilege)"
            " where n.nspname in ('pgleader', 'gateway') and c.relkind in ('r', 'v')"
            "   and (has_table_privilege(%(role)s, c.oid, p.privilege)"
            "        or (p.privilege in ('INSERT', 'UPDATE')"
            "            and has_any_column_privilege(%(role)s, c.oid, p.privilege)))"
            " order by 1, 2",
            {"role": ROLE},
        ).fetchall()
    assert rows == [("gateway.paper_broker_requests", "INSERT"), ("gateway.signals", "INSERT")]


# Every function that writes with its owner's rights: adding one is a decision.
SECURITY_DEFINER = {
    "pgleader.current_epoch(text)",
    "pgleader.join_election(text,text,text,integer,text)",
    "pgleader.take_leadership(text,text,text)",
    "pgleader.heartbeat(text,text,bigint)",
    # switchover and eligibility (sql/pgleader/migrations/003_switchover.sql)
    "pgleader.register_instance(text,text,text,integer,text,boolean,integer)",
    "pgleader.claim_leadership(text,text,text,boolean,interval,boolean)",
    "pgleader.leader_heartbeat(text,text,bigint)",
    "pgleader.request_transfer(text,text,bigint,interval,interval)",
    "pgleader.resign(text,text,bigint,text)",
    "pgleader.record_eviction(text,interval,text)",
    "pgleader.record_follower_beat(text,text)",
    "gateway.raise_alert(text,bigint,text,text)",
    "gateway.claim_signals(text,bigint,bigint[],text,text,interval,jsonb,interval,text)",
    "gateway.complete_orders(text[],text[],text[],text[],text[])",
    "gateway.requeue_signal(text,text)",
    "gateway.mark_in_doubt(text,text,boolean)",
    "gateway.set_trading_halt(text,text,text)",
    "gateway.resume_after_rewind(text,text)",  # the rewind guard (service/watermark.py)
    "gateway.settle_signal(bigint,boolean,text,text)",  # `pgleader settle`, as halt and resume
    "gateway.request_reconciliation(text,text)",
    "gateway.finish_reconciliation(bigint,bigint,text,text,jsonb,text)",
    "gateway.record_settings(text,text,text)",  # the leader's jobs (pgleader.jobs, service/jobs/)
    "gateway.book_rollover_order(text,bigint,text,text,bigint,text,text,bigint,bigint)",
    "gateway.delete_old_signals(text,bigint,interval,integer)",
    "gateway.finish_rollover(text,bigint,text,bigint)",
    "gateway.prune_instance_settings(text,bigint,text[])",
    "gateway.record_rollover_order(text,text,text,text)",
    "gateway.set_rollover_state(text,bigint,bigint,text,text)",
    "gateway.start_rollover(text,bigint,text,text,text,date,text,date,bigint)",
    "gateway.store_statistics(text,bigint,text,jsonb)",
    # alert delivery (service/alerts/)
    "gateway.start_alert_delivery(text,bigint,text,text[])",
    "gateway.claim_alert_deliveries(text,bigint,text,text,double precision,integer)",
    "gateway.finish_alert_deliveries(bigint,text,text,bigint[],text,text,double precision,integer)",
    "pgleader.finish_job(text,bigint,text,text,text,double precision,double precision)",
    "pgleader.prune_instances(text,bigint,interval)",
    "pgleader.register_job(text,bigint,text,double precision,time without time zone,text,double precision)",
    "pgleader.request_job(text,text,text)",
    "pgleader.start_job(text,bigint,text,text)",
}


def test_the_functions_that_write_run_as_the_owner_with_a_fixed_search_path(dsn):
    with psycopg.connect(dsn) as conn:
        owner = conn.info.user
        rows = conn.execute(
            "select p.oid::regprocedure::text, pg_get_userbyid(p.proowner), p.proconfig,"
            "       exists (select from aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
            "                where a.grantee = 0 and a.privilege_type = 'EXECUTE')"
            "  from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname in ('pgleader', 'gateway') and p.prosecdef"
        ).fetchall()
    assert {name for name, *_ in rows} == SECURITY_DEFINER
    for name, function_owner, config, public in rows:
        assert function_owner == owner, name
        assert "search_path=pg_catalog, pg_temp" in config, name
        assert not public, f"{name} is executable by PUBLIC"


async def test_the_functions_check_their_caller_for_themselves(db, role_dsn):
    async with await psycopg.AsyncConnection.connect(role_dsn, autocommit=True) as conn:
        await conn.execute("select pgleader.join_election('gateway', 'intruder', 'h', 1, 'x')")
        with pytest.raises(errors.ObjectNotInPrerequisiteState, match="does not hold the lock"):
            await conn.execute("select * from pgleader.take_leadership('gateway', 'intruder', 'h')")
        cur = await conn.execute("select pgleader.heartbeat('gateway', 'intruder', 0)")
        assert await cur.fetchone() == (False,)
        with pytest.raises(psycopg.Error) as fenced:
            await conn.execute(
                "select * from gateway.claim_signals('gateway', 9, '{1}', 'intruder', 'paper',"
                " '1 hour', null, '0 s', 'wait')"
            )
        assert fenced.value.sqlstate == FENCED_SQLSTATE
    cur = await db.execute("select epoch, leader from pgleader.election where name = 'gateway'")
    assert await cur.fetchone() == (0, None)


class HalfBlindBroker(PaperBroker):
    """The paper broker, unable to say what it holds of the instruments in `blind`."""

    blind: frozenset[str] = frozenset()

    async def positions(self, instruments):
        if any(i.name in self.blind for i in instruments):
            raise BrokerUnavailable("position book unavailable")
        return await super().positions(instruments)


async def test_reconciliation_alerts_and_the_fence_work_under_the_role(db, role_dsn):
    """What the processes above rarely reach, run as the role: requeue, in doubt, an
    alert of the spool, the Python fence."""
    # A crashed leader of epoch 7 left two signals claimed (two instruments), orders
    # booked, never sent.
    await db.execute("insert into pgleader.election (name, epoch) values ('gateway', 7)")
    cur = await db.execute(
        "insert into gateway.signals (fingerprint, type, instrument, position, lots, price,"
        " signal_at, payload, received_by, status, claimed_epoch, claimed_by, claimed_at)"
        " select md5(random()::text), 'BASE_ENTRY', 'I' || g, 'Long_1', 1, 100, now(), '{}',"
        "        'old', 'executing', 7, 'old', now() - interval '1 min'"
        "   from generate_series(1, 2) g order by g returning id"
    )
    ids = [r[0] for r in await cur.fetchall()]
    coids = [f"pgl-{sid}-e7-1" for sid in ids]
    for sid, coid in zip(ids, coids, strict=True):
        await db.execute(
            "insert into gateway.orders (signal_id, epoch, instance_id, broker, client_order_id,"
            " action, quantity, side, lots, start_position, target_position)"
            " values (%s, 7, 'old', 'paper', %s, 'BUY', 1, 'long', 1, 0, 1)",
            [sid, coid],
        )
    pool = AsyncConnectionPool(
        role_dsn, min_size=1, max_size=4, open=False, kwargs={"autocommit": True}
    )
    await pool.open()
    elector = Elector(role_dsn, "gateway", instance_id="role", timings=Timings(0.2, 0.6, 1.2))
    broker = HalfBlindBroker(pool, timeout=1.0)
    broker.blind = frozenset({"I2"})
    executor = Executor(
        pool, elector, broker, max_age=timedelta(minutes=5), broker_timeout=0.5,
        settle=1.0, lookup_attempts=1,
    )  # fmt: skip
    try:
        await elector.start()
        epoch = await elector.wait_for_leadership(10)
        assert epoch == 8
        settled = 0
        for _ in range(100):
            settled += await executor.reconcile()
            if settled == 2:
                break
            await asyncio.sleep(0.05)
        assert settled == 2
        assert await executor.execute(ids[0]) == "executed"  # requeued, then sent once
        async with pool.connection() as conn:
            async with conn.transaction():
                await check_epoch(conn, "gateway", epoch)
            with pytest.raises(Fenced):
                async with conn.transaction():
                    await check_epoch(conn, "gateway", epoch - 1)
            await conn.execute("select gateway.raise_alert('spool_replayed', null, 'role', 'x')")
    finally:
        await executor.stop()
        await elector.stop()
        await pool.close()
    cur = await db.execute("select status from gateway.signals order by id")
    assert await cur.fetchall() == [("executed",), ("in_doubt",)]
    cur = await db.execute("select client_order_id from gateway.paper_broker_requests")
    assert await cur.fetchall() == [(f"pgl-{ids[0]}-e8-2",)]
    cur = await db.execute("select kind, signal_id from gateway.alerts order by id")
    assert await cur.fetchall() == [("signal_in_doubt", ids[1]), ("spool_replayed", None)]
