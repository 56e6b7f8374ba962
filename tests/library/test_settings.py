"""Every setting, from its flag or its PGLEADER_* variable, refuses a bad value (empty,
garbage, NaN, infinite, negative, out of range) in one line naming it, exit 2: never
a traceback, never silently accepted, and `serve` refuses before it binds or connects.

The settings are read off the real parser, every verb's every option, so a new one
cannot escape: an option whose kind this file does not know fails the suite until
it is declared with one of pgleader.config's kinds (Number, Text, Choice, ...).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

import pgleader.demo
import service.process
from pgleader.cli import build_parser, main
from pgleader.config import (
    Choice,
    Dsn,
    Instant,
    Names,
    Networks,
    Number,
    Setting,
    Since,
    Switch,
    Text,
)
from pgleader.embedded import free_port

UNREACHABLE = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"
ENV = re.compile(r"\bPGLEADER_[A-Z_]+")


@dataclass(frozen=True)
class Option:
    verb: str
    flag: str  # --port
    dest: str
    kind: Any  # a Setting, unless someone forgot
    env: str | None  # its PGLEADER_* twin, named in its help
    takes_value: bool

    def __str__(self) -> str:
        return f"{self.verb} {self.flag}"


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(verbs.choices)


def options() -> list[Option]:
    found = []
    for verb, parser in verb_parsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            if not action.option_strings:  # a positional (`jobs run NAME`): not a setting
                continue
            flag = max(action.option_strings, key=len)
            envs = ENV.findall(action.help or "")
            takes_value = action.nargs != 0
            kind = action.type if takes_value else Switch()
            found.append(
                Option(verb, flag, action.dest, kind, envs[0] if envs else None, takes_value)
            )
    return found


OPTIONS = options()


def test_every_option_of_every_verb_has_a_declared_kind():
    undeclared = [f"{o} ({o.kind!r})" for o in OPTIONS if not isinstance(o.kind, Setting)]
    assert undeclared == [], (
        "give these a type from pgleader.config (Number, Text, Choice, ...), so that a bad"
        " value is refused in one line naming it"
    )


def test_every_serve_setting_has_a_pgleader_variable():
    """The README says so: every flag of `serve` has a PGLEADER_* twin."""
    serve = [o for o in OPTIONS if o.verb == "serve"]
    assert len(serve) > 25
    assert [str(o) for o in serve if o.env is None] == []
    assert {o.env for o in serve} >= {"PGLEADER_MIGRATE", "PGLEADER_EMBEDDED_PORT"}


def _num(value: float, kind: type) -> str:
    return str(int(value)) if kind is int else repr(float(value))


def bad_values(kind: Setting) -> list[str]:
    """Values the setting must refuse."""
    if isinstance(kind, Number):
        below = (
            kind.low if kind.above else kind.low - (1 if kind.kind is int else kind.low / 2 or 1)
        )
        values = ["", " ", "abc", "nan", "NaN", "inf", "-inf", "1e999", "-1",
                  _num(below, kind.kind), _num(kind.high * 2 + 1, kind.kind)]  # fmt: skip
        if kind.kind is int:
            values.append("1.5")
        return values
    if isinstance(kind, Dsn):  # empty means unset: the next source, or the embedded server
        return ["garbage", "host"]
    if isinstance(kind, Text):
        long = "x" * (kind.max_length + 1)
        return ["a\nb", long] if kind.empty_means_unset else ["", "a\nb", long]
    if isinstance(kind, Choice):
        return ["", "garbage", kind.choices[0].upper() + "x"]
    if isinstance(kind, Switch):
        return ["", "maybe", "2"]
    if isinstance(kind, Names):
        return ["", ",", " , "]
    if isinstance(kind, Networks):
        return ["", ",", "300.1.2.3", "10.0.0.0/33", "not-an-ip"]
    if isinstance(kind, Instant):
        return ["", "yesterday", "2026-12-24T10:00", "2026-13-01T10:00Z"]
    if isinstance(kind, Since):
        return ["", " ", "yesterday", "0s", "-5m", "2h30", "1.5h", "10w", "1e3s", "3651d",
                "99999999999d", "2026-13-01T10:00Z"]  # fmt: skip
    raise AssertionError(f"no bad values known for {kind!r}: add them here")


def representative(kind: Setting) -> str:
    """The one bad value the subprocess run tries."""
    preferred = {Number: "nan", Text: "", Choice: "garbage", Switch: "maybe", Names: ",",
                 Networks: "300.1.2.3", Dsn: "garbage", Instant: "yesterday",
                 Since: "2h30"}  # fmt: skip
    value = preferred[type(kind)]
    return value if value in bad_values(kind) else bad_values(kind)[0]


def command(option: Option, value: str, source: str) -> tuple[list[str], dict[str, str]]:
    """argv and environment of a run that differs from a valid one only in `option`."""
    env = {"PGLEADER_WEBHOOK_SECRET": "x"} if option.verb == "serve" else {}
    base: dict[str, str] = {"dsn": UNREACHABLE}
    if option.verb == "serve":  # were it accepted: fail fast, on ports nobody uses
        base |= {"port": str(free_port()), "operator_port": str(free_port()),
                 "startup_timeout": "1", "log_format": "json"}  # fmt: skip
    base.pop(option.dest, None)
    if option.dest == "port":
        base.pop("operator_port", None)  # its default follows the port
    argv = [option.verb] + [f"--{k.replace('_', '-')}={v}" for k, v in base.items()]
    if source == "flag":
        argv.append(f"{option.flag}={value}")
    else:
        assert option.env is not None
        env[option.env] = value
    return argv, env


def clean_environment() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("PGLEADER_") and k != "DATABASE_URL"
    }


def cases(source: str) -> Iterator[tuple[Option, str]]:
    for option in OPTIONS:
        if not isinstance(option.kind, Setting):
            continue  # test_every_option_of_every_verb_has_a_declared_kind fails
        if source == "flag" and not option.takes_value:
            continue
        if source == "env" and option.env is None:
            continue
        for value in bad_values(option.kind):
            yield option, value


def assert_refused(option: Option, source: str, value: str, code: Any, stderr: str) -> None:
    what = f"`{option}` from {source} = {value!r}"
    assert "Traceback" not in stderr, f"{what}: {stderr}"
    lines = [line for line in stderr.splitlines() if line and not line.startswith("{")]
    assert code == 2, f"{what}: exit {code}, {stderr!r}"
    assert len(lines) == 1, f"{what}: {stderr!r}"
    name = option.flag if source == "flag" else option.env
    assert name in lines[0], f"{what}: the error does not name {name}: {lines[0]!r}"


@pytest.fixture
def no_start(monkeypatch):
    """A setting that got through would start something: make that a test failure."""

    async def would_start(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("a bad value was accepted: the process would start")

    monkeypatch.setattr(service.process, "serve", would_start)
    monkeypatch.setattr(pgleader.demo, "run_demo", would_start)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_every_bad_value_of_every_setting_is_one_line_naming_it(
    source, no_start, monkeypatch, capsys
):
    """In-process, every value of bad_values() for every option."""
    tried = 0
    for option, value in cases(source):
        argv, env = command(option, value, source)
        for key in list(os.environ):
            if key.startswith("PGLEADER_") or key == "DATABASE_URL":
                monkeypatch.delenv(key)
        for key, val in env.items():
            monkeypatch.setenv(key, val)
        try:
            code: Any = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert_refused(option, source, value, code, capsys.readouterr().err)
        tried += 1
    assert tried > 200


@pytest.mark.slow
def test_a_bad_setting_stops_the_real_command_before_it_starts():
    """As a user runs it (`python -m pgleader ...`), with one bad value each: every
    PGLEADER_* variable, and a flag of each kind on each verb (a flag's value goes
    through its kind as argparse's `type`, one path for all: the in-process test above
    tries every flag). `serve` would bind and connect were a value accepted."""
    runs, seen = [], set()
    for option in sorted(OPTIONS, key=lambda o: o.verb != "serve"):
        if not isinstance(option.kind, Setting):
            continue
        key = ("flag", option.verb, type(option.kind))
        if option.takes_value and key not in seen:
            seen.add(key)
            runs.append((option, "flag", representative(option.kind)))
        if option.env and ("env", option.env) not in seen:
            seen.add(("env", option.env))
            runs.append((option, "env", representative(option.kind)))

    def one(run: tuple[Option, str, str]) -> None:
        option, source, value = run
        argv, env = command(option, value, source)
        result = subprocess.run(
            [sys.executable, "-m", "pgleader", *argv],
            capture_output=True, text=True, timeout=30, env={**clean_environment(), **env},
        )  # fmt: skip
        assert_refused(option, source, value, result.returncode, result.stderr)

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2)) as pool:
        list(pool.map(one, runs))
    assert len(runs) > 40, len(runs)


@pytest.mark.parametrize(
    ("value", "migrate"), [("false", False), ("0", False), ("true", True), ("on", True)]
)
def test_no_migrate_has_a_variable_twin(value, migrate, monkeypatch):
    from service.config import from_args

    monkeypatch.setenv("PGLEADER_MIGRATE", value)
    args = verb_parsers()["serve"].parse_args(["--webhook-secret", "x"])
    assert from_args(args, None, None).migrate is migrate  # type: ignore[arg-type]
    args = verb_parsers()["serve"].parse_args(["--webhook-secret", "x", "--no-migrate"])
    assert from_args(args, None, None).migrate is False  # type: ignore[arg-type]


def test_an_empty_token_means_none_and_an_empty_flag_overrides_the_variable(monkeypatch):
    from service.config import from_args

    serve = verb_parsers()["serve"]
    monkeypatch.setenv("PGLEADER_ADMIN_TOKEN", "")  # compose passes "" for "disabled"
    monkeypatch.setenv("PGLEADER_OPERATOR_TOKEN", "t0ken")
    config = from_args(serve.parse_args(["--webhook-secret", "x"]), None, None)  # type: ignore[arg-type]
    assert config.admin_token is None and config.operator_token == "t0ken"
    args = serve.parse_args(["--webhook-secret", "x", "--operator-token", ""])
    assert from_args(args, None, None).operator_token is None  # type: ignore[arg-type]


def test_a_bad_variable_is_refused_only_by_the_verbs_that_read_it(dsn):
    """`status` has no heartbeat: PGLEADER_HEARTBEAT=abc does not concern it."""
    env = {**clean_environment(), "PGLEADER_HEARTBEAT": "abc"}
    status = subprocess.run(
        [sys.executable, "-m", "pgleader", "status", "--dsn", dsn],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    elect = subprocess.run(
        [sys.executable, "-m", "pgleader", "elect", "--dsn", dsn],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert elect.returncode == 2 and elect.stderr.startswith(
        "pgleader elect: error: PGLEADER_HEARTBEAT"
    )
