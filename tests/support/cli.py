"""`pgleader` verbs run in this process, for tests that run many of them (no
interpreter to start per run), or on a terminal (a pty), to read their tables.
What a user sees on a real exit is for the subprocess runs
(tests.support.gateway.pgleader_cli)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from pgleader.cli import main

__all__ = ["CLOCK", "assert_aligned", "on_terminal", "pgleader_here"]

# A time as the tables and `watch --human` print it.
CLOCK = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


async def pgleader_here(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `pgleader ARGS` run by `main` in a thread (it runs
    its own event loop), with no PGLEADER_* variable but `env`; stdout is not a
    terminal. Not concurrently with anything that writes to stdout or reads the
    environment."""

    def call() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with (
            _environment(env or {}),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code: Any = main(list(args))
            except SystemExit as exc:
                code = exc.code
        return int(code or 0), out.getvalue(), err.getvalue()

    return await asyncio.to_thread(call)


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("PGLEADER_") or k == "DATABASE_URL"]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def on_terminal(*args: str) -> str:
    """What `pgleader ARGS` prints on a terminal (its stdout a pty)."""
    terminal, child = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("PGLEADER_DSN", "DATABASE_URL")}
    with subprocess.Popen(
        [sys.executable, "-m", "pgleader", *args], stdout=child, stderr=subprocess.PIPE, env=env
    ) as proc:  # fmt: skip
        os.close(child)
        chunks = []
        with contextlib.suppress(OSError):  # EIO once the child has exited
            while chunk := os.read(terminal, 65536):
                chunks.append(chunk)
        os.close(terminal)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
    return b"".join(chunks).decode().replace("\r\n", "\n")


def assert_aligned(table: str, columns: list[str]) -> list[str]:
    """A header of upper-case names, and every column starting where its name does."""
    lines = table.rstrip("\n").splitlines()
    header = lines[0]
    assert header.split() == [c.upper() for c in columns], header
    starts = [header.index(c.upper()) for c in columns]
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", (line, start)
    return lines
