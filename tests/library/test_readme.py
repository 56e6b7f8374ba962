"""The README, tried literally so it cannot rot: its code samples run, its answers are
the answers, its settings table is `serve --help`, its event fields mean what it says."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from pgleader.demo import ElectorProcess, Timeline
from tests.support.gateway import SECRET, cluster

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text()
FLAT = " ".join(TEXT.split())  # prose wraps anywhere: compare on single spaces


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # where it opens
    section: str  # the "## " heading it sits under


def blocks() -> list[Block]:
    found, section, opened = [], "", None
    lines: list[str] = []
    for number, line in enumerate(TEXT.splitlines(), 1):
        if opened is None and line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("```"):
            if opened is None:
                opened, lines = (line[3:].strip(), number), []
            else:
                found.append(Block(opened[0], "\n".join(lines) + "\n", opened[1], section))
                opened = None
            continue
        if opened is not None:
            lines.append(line)
    assert opened is None, f"README.md:{opened[1]}: a code block is never closed"
    return found


def clean_environment() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("PGLEADER_") and k != "DATABASE_URL"
    }


def test_every_code_fence_stands_on_a_line_of_its_own():
    """A fence glued to text (```` ``` Leadership gained is ````) turns the rest of the
    file into one code block."""
    glued = [
        f"README.md:{n}: {line!r}"
        for n, line in enumerate(TEXT.splitlines(), 1)
        if "```" in line and not re.fullmatch(r"```[\w-]*", line.strip())
    ]
    assert glued == []
    assert blocks()


# -- the library ---------------------------------------------------------------------


def library_example() -> Block:
    return next(b for b in blocks() if b.section == "The library" and b.lang == "python")


def run_example(dsn: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "example.py"
    script.write_text(library_example().code)
    return subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True, text=True, timeout=60,
        env={**clean_environment(), "PGLEADER_DSN": dsn},
    )  # fmt: skip


def test_the_library_example_runs_as_written(dsn, tmp_path):
    result = run_example(dsn, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "worked under epoch 1" in result.stdout.splitlines()  # beside structlog's lines


def test_the_library_example_on_an_unmigrated_database_says_to_migrate(
    empty_database_dsn, tmp_path
):
    result = run_example(empty_database_dsn, tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pgleader.errors.SchemaMissing:") and "run `pgleader migrate`" in last
    assert "`pgleader migrate`" in FLAT[FLAT.index("## The library") :]


def test_every_other_python_sample_is_valid_python():
    for block in blocks():
        if block.lang == "python":
            compile(block.code, f"README.md:{block.line}", "exec", ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


# -- the gateway ---------------------------------------------------------------------


def first_curl() -> tuple[str, dict[str, object]]:
    """The first `curl ... /webhook` sample: the command, and the answer it shows."""
    block = next(b for b in blocks() if b.lang == "sh" and "/webhook" in b.code)
    command = "\n".join(x for x in block.code.splitlines() if not x.startswith("#"))
    shown = next(x for x in block.code.splitlines() if x.startswith("# {"))
    return command, json.loads(shown[2:])


def webhook_body() -> dict[str, object]:
    block = next(b for b in blocks() if b.lang == "json" and '"timestamp"' in b.code)
    return json.loads(block.code)


async def test_the_curl_sample_and_the_fixed_body_answer_what_the_readme_shows(dsn, tmp_path):
    command, shown = first_curl()
    async with cluster(dsn, tmp_path) as gw:
        (node,) = await gw.start(1)
        await gw.leader()
        command = command.replace("http://127.0.0.1:8080", node.url)
        command = command.replace("local-dev-secret", SECRET)
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", command, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert json.loads(out) == shown

        body = {**webhook_body(), "secret": SECRET}  # "..." stands for yours
        status, answer = await gw.post(node, body)
        assert (status, answer["status"]) == (200, "expired"), answer
    assert 'answers `200 {"status": "expired", "signal_id": ...}` from the leader' in FLAT


def test_the_psql_queries_run_on_a_migrated_database(dsn):
    statements = []
    for block in blocks():
        if block.lang == "sql":
            code = "\n".join(line.split("--", 1)[0] for line in block.code.splitlines())
            statements += [s.strip() for s in code.split(";") if s.strip()]
    assert len(statements) >= 10
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())  # raises on a wrong column, view or table


def variables(text: str) -> set[str]:
    return set(re.findall(r"\bPGLEADER_[A-Z_]*[A-Z]", text))


def settings_table() -> str:
    section = TEXT[TEXT.index("## The gateway contract") :]
    rows = section[section.index("| setting |") :].split("\n\n", 1)[0]
    return "\n".join(row.split(" | ")[0] for row in rows.splitlines())


def test_the_settings_table_is_what_serve_help_lists():
    help_text = subprocess.run(
        [sys.executable, "-m", "pgleader", "serve", "--help"],
        capture_output=True, text=True, timeout=30, env=clean_environment(),
    ).stdout  # fmt: skip
    in_help, in_table = variables(" ".join(help_text.split())), variables(settings_table())
    assert len(in_help) > 25
    assert sorted(in_help - in_table) == [], "missing from the README's table"
    assert sorted(in_table - in_help) == [], "in the README's table, unknown to serve"
    assert "DATABASE_URL" in settings_table() and "DATABASE_URL" in help_text


def test_watch_prints_the_line_the_readme_shows(dsn):
    with subprocess.Popen(
        [sys.executable, "-m", "pgleader", "watch", "--dsn", dsn],
        stdout=subprocess.PIPE, text=True, env=clean_environment(),
    ) as proc:  # fmt: skip
        try:
            first = proc.stdout.readline().strip()
        finally:
            proc.terminate()
            proc.wait(10)
    assert first == '{"event": "watching", "reconnects": 0}'
    assert f"prints `{first}` when it connects" in FLAT


async def test_an_evicted_event_names_the_evicting_follower_as_leader(dsn):
    """The README: in `evicted`, `previous` is the hung leader and `leader` the follower
    that evicted it."""
    fast = ["--heartbeat", "0.2", "--lease", "0.6", "--evict-after", "1.2"]
    lines = Timeline()
    procs = [ElectorProcess(dsn, "main", name, *fast) for name in ("e1", "e2")]
    events: list[dict[str, object]] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute("listen pgleader_events")
        try:
            for p in procs:
                await p.start(lines)
            _, _, elected = await lines.wait(event="elected")
            hung = next(p for p in procs if p.instance_id == elected["instance"])
            other = next(p for p in procs if p is not hung)
            hung.signal(signal.SIGSTOP)
            async with asyncio.timeout(15):
                async for n in listener.notifies():
                    events.append(json.loads(n.payload))
                    if events[-1]["event"] == "elected" and events[-1]["epoch"] == 2:
                        break
        finally:
            for p in procs:
                with contextlib.suppress(Exception):
                    await p.stop()
    evicted = next(e for e in events if e["event"] == "evicted")
    assert evicted["previous"] == hung.instance_id and evicted["epoch"] == 1
    assert evicted["leader"] == other.instance_id  # the evicting follower
    assert events[-1]["leader"] == other.instance_id  # here it also leads next
    assert "In `evicted`, `previous` is the hung leader, `epoch` its term, and `leader` is" in FLAT
