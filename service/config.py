"""The gateway's settings: CLI flags, each mirrored by a PGLEADER_* environment variable."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pgleader.config import Timings, default_instance_id
from pgleader.errors import ConfigError

__all__ = ["ServiceConfig", "add_arguments", "from_args"]


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    dsn: str | None
    host: str = "127.0.0.1"
    port: int = 8080
    operator_host: str = "127.0.0.1"
    operator_port: int = 9080
    operator_token: str | None = None
    max_connections: int = 256
    request_timeout: float = 5.0
    instance_id: str = field(default_factory=default_instance_id)
    webhook_secret: str = ""
    admin_token: str | None = None
    broker: str = "paper"
    election: str = "gateway"
    timings: Timings = field(default_factory=Timings)
    log_format: str = "json"
    data_dir: Path = Path("var")
    embedded_port: int = 54329
    max_signal_age: timedelta = timedelta(seconds=120)
    max_future_skew: timedelta = timedelta(seconds=5)
    max_body_bytes: int = 16 * 1024
    spool_max_bytes: int = 64 * 1024 * 1024
    instruments: frozenset[str] | None = None
    allowed_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    shutdown_timeout: float = 30.0
    sweep_interval: float = 1.0
    inline_timeout: float = 2.0
    broker_timeout: float = 5.0
    batch_interval: float = 0.005
    startup_timeout: float = 60.0
    migrate: bool = True

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool" / f"{self.instance_id}.jsonl"


# flag, env suffix, type, default, help
_OPTIONS: list[tuple[str, type, object, str]] = [
    ("host", str, "127.0.0.1", "address of the public listener (webhook, health, ready)"),
    ("port", int, 8080, "port of the public listener"),
    (
        "operator-host",
        str,
        "127.0.0.1",
        "address of the operator's listener (signals, metrics,"
        " coordinator, admin): keep it off the internet",
    ),
    (
        "operator-port",
        int,
        None,
        "port of the operator's listener (default: the public port + 1000)",
    ),
    (
        "operator-token",
        str,
        None,
        "read token of the operator's listener: Bearer header or cookie"
        " pgleader_operator_token (unset: no token)",
    ),
    ("max-connections", int, 256, "open connections per listener; more are answered 503"),
    (
        "request-timeout",
        float,
        5.0,
        "seconds a client gets to send a whole request (head and body)",
    ),
    ("instance-id", str, None, "this instance's id (default: hostname-pid)"),
    ("webhook-secret", str, None, "shared secret expected in the webhook body (required)"),
    ("admin-token", str, None, "bearer token for admin endpoints (unset: admin disabled)"),
    ("broker", str, "paper", "broker to execute on (paper)"),
    ("election", str, "gateway", "election name"),
    ("log-format", str, None, "json or console (default: console on a terminal, else json)"),
    ("data-dir", str, "var", "embedded PostgreSQL data and the outage spool live here"),
    ("embedded-port", int, 54329, "port of the embedded PostgreSQL (no DSN given)"),
    ("max-signal-age", float, 120.0, "signals older than this (s) expire instead of executing"),
    ("max-future-skew", float, 5.0, "tolerated clock skew of signal timestamps (s)"),
    ("max-body-bytes", int, 16 * 1024, "largest webhook body accepted"),
    ("spool-max-bytes", int, 64 * 1024 * 1024, "cap of this instance's outage spool file"),
    ("instruments", str, None, "comma-separated instrument allow-list (default: any)"),
    ("allowed-ips", str, None, "comma-separated source addresses/networks (default: any)"),
    ("shutdown-timeout", float, 30.0, "seconds in-flight requests get on shutdown"),
    ("sweep-interval", float, 1.0, "seconds between sweeps for pending signals"),
    ("broker-timeout", float, 5.0, "seconds a broker call may take before its outcome is unknown"),
    ("startup-timeout", float, 60.0, "seconds to keep retrying an unreachable database at start"),
    (
        "batch-interval",
        float,
        0.005,
        "under load, seconds between the starts of the leader's execution batches (0: no wait;"
        " more: bigger batches, less CPU per signal, that much more latency)",
    ),
]


def _env(flag: str) -> str:
    return "PGLEADER_" + flag.upper().replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the serve flags; each defaults to its PGLEADER_* environment variable."""
    for flag, kind, default, text in _OPTIONS:
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=None,
            help=f"{text} [env {_env(flag)}" + (f", default {default}]" if default else "]"),
        )
    parser.add_argument(
        "--no-migrate", action="store_true", help="do not apply missing migrations at start"
    )


def _pick(args: argparse.Namespace, flag: str, kind: type, default: object) -> object:
    value = getattr(args, flag.replace("-", "_"), None)
    if value is not None:
        return value
    raw = os.environ.get(_env(flag))
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{_env(flag)}={raw!r} is not a valid {kind.__name__}") from None


def from_args(args: argparse.Namespace, dsn: str | None, timings: Timings) -> ServiceConfig:
    """Validated settings from flags and environment; ConfigError names what is wrong."""
    v = {flag: _pick(args, flag, kind, default) for flag, kind, default, _ in _OPTIONS}
    secret = v["webhook-secret"]
    if not secret:
        raise ConfigError("no webhook secret: set PGLEADER_WEBHOOK_SECRET or --webhook-secret")
    port = int(str(v["port"]))
    if not 1 <= port <= 65535:
        raise ConfigError(f"port must be 1..65535, got {port}")
    operator_port = int(str(v["operator-port"] or port + 1000))
    if not 1 <= operator_port <= 65535:
        raise ConfigError(
            f"operator port must be 1..65535, got {operator_port} (set --operator-port)"
        )
    if operator_port == port:
        raise ConfigError(f"the operator port must differ from the public port ({port})")
    if int(str(v["max-connections"])) < 1:
        raise ConfigError("--max-connections must be at least 1")
    if v["broker"] != "paper":
        raise ConfigError(f"unknown broker {v['broker']!r}: available brokers are: paper")
    log_format = v["log-format"] or ("console" if os.isatty(2) else "json")
    if log_format not in ("json", "console"):
        raise ConfigError(f"log format must be json or console, got {log_format!r}")
    for name in (
        "max-signal-age", "max-future-skew", "shutdown-timeout", "sweep-interval", "broker-timeout",
        "startup-timeout", "request-timeout",
    ):  # fmt: skip
        if float(str(v[name])) <= 0:
            raise ConfigError(f"--{name} must be positive")
    if not 0 <= float(str(v["batch-interval"])) <= 1:
        raise ConfigError("--batch-interval must be between 0 and 1 s")
    if int(str(v["spool-max-bytes"])) < 64 * 1024:
        raise ConfigError("--spool-max-bytes must be at least 65536 (64 KiB)")
    instruments = None
    if v["instruments"]:
        instruments = frozenset(
            s.strip().upper() for s in str(v["instruments"]).split(",") if s.strip()
        )
    try:
        allowed = tuple(
            ipaddress.ip_network(s.strip(), strict=False)
            for s in str(v["allowed-ips"] or "").split(",")
            if s.strip()
        )
    except ValueError as exc:
        raise ConfigError(f"allowed IPs: {exc}") from None
    return ServiceConfig(
        dsn=dsn,
        host=str(v["host"]),
        port=port,
        operator_host=str(v["operator-host"]),
        operator_port=operator_port,
        operator_token=str(v["operator-token"]) if v["operator-token"] else None,
        max_connections=int(str(v["max-connections"])),
        request_timeout=float(str(v["request-timeout"])),
        instance_id=str(v["instance-id"] or default_instance_id()),
        webhook_secret=str(secret),
        admin_token=str(v["admin-token"]) if v["admin-token"] else None,
        broker=str(v["broker"]),
        election=str(v["election"]),
        timings=timings,
        log_format=log_format,
        data_dir=Path(str(v["data-dir"])),
        embedded_port=int(str(v["embedded-port"])),
        max_signal_age=timedelta(seconds=float(str(v["max-signal-age"]))),
        max_future_skew=timedelta(seconds=float(str(v["max-future-skew"]))),
        max_body_bytes=int(str(v["max-body-bytes"])),
        spool_max_bytes=int(str(v["spool-max-bytes"])),
        instruments=instruments,
        allowed_ips=allowed,
        shutdown_timeout=float(str(v["shutdown-timeout"])),
        sweep_interval=float(str(v["sweep-interval"])),
        broker_timeout=float(str(v["broker-timeout"])),
        startup_timeout=float(str(v["startup-timeout"])),
        batch_interval=float(str(v["batch-interval"])),
        migrate=not args.no_migrate,
    )
