"""The gateway's settings: CLI flags, each mirrored by a PGLEADER_* environment variable."""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from pgleader.config import (
    Choice,
    Names,
    Networks,
    Number,
    Setting,
    Switch,
    Text,
    Timings,
    default_instance_id,
    env_setting,
)
from pgleader.errors import ConfigError
from pgleader.redis import redis_url_problem
from service.brokers.base import Instrument
from service.instruments import load_instruments, settings_fingerprint

__all__ = [
    "ServiceConfig", "SinkSettings", "add_arguments", "add_sink_arguments", "from_args",
    "sink_settings",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """Where the leader delivers alerts and leadership transitions (service/alerts/).
    The token and the webhook URLs are secrets: never logged, never in an error."""

    telegram_token: str = field(default="", repr=False)
    telegram_chat_id: str = ""
    telegram_url: str = "https://api.telegram.org"
    slack_webhook_url: str = field(default="", repr=False)
    alert_webhook_url: str = field(default="", repr=False)

    @property
    def configured(self) -> list[str]:
        """The names of the sinks set: telegram, slack, webhook."""
        return [
            name
            for name, value in (
                ("telegram", self.telegram_token),
                ("slack", self.slack_webhook_url),
                ("webhook", self.alert_webhook_url),
            )
            if value
        ]


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
    instruments_file: Path | None = None
    # what the instruments file says, by webhook instrument (None: no file)
    trading: dict[str, Instrument] | None = None
    openalgo_url: str = "http://127.0.0.1:5000"
    openalgo_api_key: str = field(default="", repr=False)
    openalgo_strategy: str = "pgleader"
    openalgo_mode: str = "analyze"
    openalgo_order_rate: float = 10.0
    broker_settle: float = 30.0
    reorder_window: float = 3.0
    halt_action: str = "wait"
    reconcile_interval: float = 3600.0
    retention_days: int = 0
    prune_instances_after: float = 86400.0
    rollover_interval: float = 60.0
    statistics_interval: float = 300.0
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
    lead: bool = True  # false (--no-lead): accept and store signals, never campaign
    priority: int = 0  # higher wins a failover (lower ones hold back briefly)
    sinks: SinkSettings = field(default_factory=SinkSettings)
    alert_group_interval: float = 10.0
    alert_timeout: float = 10.0
    db_down_alert_after: float = 30.0
    # optional cache (leader key, fingerprints), never authoritative; may carry a password
    redis_url: str = field(default="", repr=False)

    @property
    def accepted_instruments(self) -> frozenset[str] | None:
        """What the webhook takes: the allow-list, and the instruments file's names."""
        names = None if self.trading is None else frozenset(self.trading)
        if self.instruments is None or names is None:
            return names if self.instruments is None else self.instruments
        return self.instruments & names

    @property
    def settings_fingerprint(self) -> str:
        """What every instance must agree on to trade consistently: followers decide
        what they accept, the leader what it executes."""
        return settings_fingerprint(
            instruments=self.trading,
            max_signal_age=self.max_signal_age,
            allow_list=self.instruments,
            halt_action=self.halt_action,
            broker=self.broker,
        )

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool" / f"{self.instance_id}.jsonl"


KiB, MiB = 1024, 1024 * 1024
_PORT = Number(int, 1, 65535)
_TOKEN = Text(secret=True, empty_means_unset=True)  # empty: none (compose passes "")

# flag (its variable is PGLEADER_<FLAG>), kind (range included), default, help
# fmt: off
_OPTIONS: list[tuple[str, Setting, object, str]] = [
    ("host", Text(), "127.0.0.1", "address of the public listener (webhook, health, ready)"),
    ("port", _PORT, 8080, "port of the public listener"),
    (
        "operator-host",
        Text(),
        "127.0.0.1",
        "address of the operator's listener (signals, metrics,"
        " coordinator, admin): keep it off the internet",
    ),
    (
        "operator-port",
        _PORT,
        None,
        "port of the operator's listener (default: the public port + 1000)",
    ),
    (
        "operator-token",
        _TOKEN,
        None,
        "read token of the operator's listener: Bearer header or cookie"
        " pgleader_operator_token (unset: no token)",
    ),
    ("max-connections", Number(int, 1, 100_000), 256, "open connections per listener; more are answered 503"),
    (
        "request-timeout",
        Number(float, 0.1, 600, "s"),
        5.0,
        "seconds a client gets to send a whole request (head and body)",
    ),
    ("instance-id", Text(200), None, "this instance's id (default: hostname-pid)"),
    ("webhook-secret", Text(secret=True), None, "shared secret expected in the webhook body (required)"),
    ("admin-token", _TOKEN, None, "bearer token for admin endpoints (unset: admin disabled)"),
    ("broker", Choice("paper", "openalgo"), "paper", "broker to execute on: paper (the database's own book) or openalgo"),
    ("instruments-file", Text(), None, "TOML file mapping each webhook instrument to exchange, symbol, product, lot_size, max_lots (required with openalgo); a webhook for another instrument is refused"),
    ("openalgo-url", Text(), "http://127.0.0.1:5000", "OpenAlgo's address"),
    ("openalgo-api-key", Text(secret=True, empty_means_unset=True), None, "OpenAlgo API key (required with openalgo; never logged)"),
    ("openalgo-strategy", Text(50), "pgleader", "strategy label of the orders sent to OpenAlgo"),
    ("openalgo-mode", Choice("analyze", "live"), "analyze", "the mode OpenAlgo must be in (analyze: its sandbox); an answer in the other mode halts trading"),
    ("openalgo-order-rate", Number(float, 0.1, 1000, "orders/s"), 10.0, "orders per second sent to OpenAlgo at most (its own limit is 10/s by default)"),
    ("broker-settle", Number(float, 0.1, 3600, "s"), 30.0, "seconds after an unknown outcome before the broker is asked what became of the order"),
    ("reorder-window", Number(float, 0, 60, "s"), 3.0, "seconds an entry that would be refused waits for a signal of the same second that makes it valid (a reversal's exit)"),
    ("halt-action", Choice("wait", "reject"), "wait", "what halted trading does to new signals: wait (they expire by the max age) or reject"),
    ("reconcile-interval", Number(float, 10, 7 * 86400, "s"), 3600.0, "seconds between the leader's reconciliations of positions with the broker"),
    ("retention-days", Number(int, 0, 36500, "days"), 0, "the leader deletes terminal signals older than this many days (0: keep everything); orders, positions and alerts are kept"),
    ("prune-instances-after", Number(float, 60, 365 * 86400, "s"), 86400.0, "instances not seen for this long leave pgleader.instances (the leadership history keeps them)"),
    ("rollover-interval", Number(float, 1, 3600, "s"), 60.0, "seconds between the leader's checks for futures to roll (instruments with a contract rule)"),
    ("statistics-interval", Number(float, 1, 86400, "s"), 300.0, "seconds between refreshes of the leader's statistics (GET /statistics, pgleader stats)"),
    ("election", Text(200), "gateway", "election name"),
    ("priority", Number(int, 0, 1000), 0, "leadership priority: after a leader disappears, followers of a lower priority hold back briefly (2 x heartbeat) while an eligible instance of a higher one is alive, so that it wins"),
    ("log-format", Choice("json", "console"), None, "json or console (default: console on a terminal, else json)"),
    ("data-dir", Text(), "var", "the outage spool, and the embedded PostgreSQL (no DSN given) in DATA_DIR/pg; as root, when the postgres user cannot reach that, in /var/lib/pgleader/embedded/<hash of DATA_DIR>"),
    ("embedded-port", Number(int, 1024, 65535), 54329, "port of the embedded PostgreSQL (no DSN given)"),
    ("max-signal-age", Number(float, 1, 7 * 86400, "s"), 120.0, "signals older than this (s) expire instead of executing"),
    ("max-future-skew", Number(float, 0, 3600, "s", above=True), 5.0, "tolerated clock skew of signal timestamps (s)"),
    ("max-body-bytes", Number(int, 1 * KiB, 1 * MiB, "bytes"), 16 * KiB, "largest webhook body accepted"),
    ("spool-max-bytes", Number(int, 64 * KiB, 1024**4, "bytes"), 64 * MiB, "cap of this instance's outage spool file"),
    ("instruments", Names(), None, "comma-separated instrument allow-list (default: any)"),
    ("allowed-ips", Networks(), None, "comma-separated source addresses/networks (default: any)"),
    ("shutdown-timeout", Number(float, 0, 3600, "s", above=True), 30.0, "seconds in-flight requests get on shutdown"),
    ("sweep-interval", Number(float, 0.01, 60, "s"), 1.0, "seconds between sweeps for pending signals"),
    ("broker-timeout", Number(float, 0, 600, "s", above=True), 5.0, "seconds a broker call may take before its outcome is unknown"),
    ("startup-timeout", Number(float, 0, 86400, "s", above=True), 60.0, "seconds to keep retrying an unreachable database at start"),
    ("alert-group-interval", Number(float, 0, 3600, "s"), 10.0, "seconds an alert sink waits after a message before the next; alerts and transitions due meanwhile go out as one grouped message"),
    ("alert-timeout", Number(float, 0, 300, "s", above=True), 10.0, "seconds an alert sink gets to answer; without an answer the message is sent again, marked as a repeat"),
    ("db-down-alert-after", Number(float, 1, 3600, "s"), 30.0, "seconds without reaching PostgreSQL after which this instance messages the alert sinks itself (the leader delivers alerts from the database), and again once it is back"),
    ("redis-url", Text(secret=True, empty_means_unset=True), None, "optional Redis, never authoritative (redis://[:password@]host:port/db): the leader publishes itself there, and duplicates are answered as such while PostgreSQL is down; needs pip install 'pgleader[redis]' (the password is never logged)"),
    (
        "batch-interval",
        Number(float, 0, 1, "s"),
        0.005,
        "under load, seconds between the starts of the leader's execution batches (0: no wait;"
        " more: bigger batches, less CPU per signal, that much more latency)",
    ),
]
# Where alerts go: read by `serve` and by `pgleader sinks`.
_SINK_OPTIONS: list[tuple[str, Setting, object, str]] = [
    ("telegram-token", Text(200, secret=True, empty_means_unset=True), None, "Telegram bot token the leader sends alerts and leadership changes with (with the chat id; never logged)"),
    ("telegram-chat-id", Text(100, empty_means_unset=True), None, "the Telegram chat alerts go to: a chat id (-1001234567890) or @channel"),
    ("telegram-url", Text(), "https://api.telegram.org", "Telegram Bot API's address"),
    ("slack-webhook-url", Text(secret=True, empty_means_unset=True), None, "a Slack-compatible incoming webhook the leader posts alerts to (a secret: never logged)"),
    ("alert-webhook-url", Text(secret=True, empty_means_unset=True), None, "a URL the leader POSTs each alert to as JSON (never logged)"),
]
_OPTIONS += _SINK_OPTIONS
# fmt: on


def _env(flag: str) -> str:
    return "PGLEADER_" + flag.upper().replace("-", "_")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the serve flags; each defaults to its PGLEADER_* environment variable."""
    _add(parser, _OPTIONS)
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        help="do not apply missing migrations at start [env PGLEADER_MIGRATE=false]",
    )
    parser.add_argument(
        "--no-lead",
        action="store_true",
        help="never lead: accept and store signals, never campaign (e.g. an instance behind"
        " an address the broker does not know) [env PGLEADER_LEAD=false]",
    )


def add_sink_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the alert sinks' flags (`pgleader sinks`), as `serve` has them."""
    _add(parser, _SINK_OPTIONS)


def _add(parser: argparse.ArgumentParser, options: list[tuple[str, Setting, object, str]]) -> None:
    for flag, kind, default, text in options:
        extra = f"; {kind.describe()}" if isinstance(kind, Number) else ""
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=None,
            help=f"{text} [env {_env(flag)}"
            + (f", default {default}" if default is not None else "")
            + f"{extra}]",
        )


def _pick(args: argparse.Namespace, flag: str, kind: Setting, default: object) -> object:
    """The flag's value (argparse parsed it), else its variable's, else the default."""
    value = getattr(args, flag.replace("-", "_"), None)
    return env_setting(_env(flag), kind, default) if value is None else value


def sink_settings(args: argparse.Namespace) -> SinkSettings:
    """The alert sinks of the flags and environment; ConfigError names what is wrong
    (never echoing a token or a URL: both may carry secrets)."""
    v = {flag: _pick(args, flag, kind, default) for flag, kind, default, _ in _SINK_OPTIONS}
    token, chat = str(v["telegram-token"] or ""), str(v["telegram-chat-id"] or "")
    if bool(token) != bool(chat):
        raise ConfigError(
            "Telegram needs both its bot token and its chat id: set PGLEADER_TELEGRAM_TOKEN"
            " and PGLEADER_TELEGRAM_CHAT_ID (or --telegram-token and --telegram-chat-id)"
        )
    for flag in ("telegram-url", "slack-webhook-url", "alert-webhook-url"):
        url = str(v[flag] or "")
        if url and not _http_url(url):
            raise ConfigError(f"{_env(flag)} (or --{flag}) must be an http:// or https:// URL")
    return SinkSettings(
        telegram_token=token,
        telegram_chat_id=chat,
        telegram_url=str(v["telegram-url"]).rstrip("/"),
        slack_webhook_url=str(v["slack-webhook-url"] or ""),
        alert_webhook_url=str(v["alert-webhook-url"] or ""),
    )


def _http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def from_args(args: argparse.Namespace, dsn: str | None, timings: Timings) -> ServiceConfig:
    """Validated settings from flags and environment; ConfigError names what is wrong."""
    v = {flag: _pick(args, flag, kind, default) for flag, kind, default, _ in _OPTIONS}
    secret = v["webhook-secret"]
    if not secret:
        raise ConfigError("no webhook secret: set PGLEADER_WEBHOOK_SECRET or --webhook-secret")
    # Each value is parsed and in its range (see _OPTIONS); what is left is how they combine.
    port = int(str(v["port"]))
    operator_port = int(str(v["operator-port"] or port + 1000))
    if operator_port > 65535:
        raise ConfigError(
            f"the operator port defaults to the public port + 1000 ({operator_port}),"
            " beyond 65535: set --operator-port / PGLEADER_OPERATOR_PORT"
        )
    if operator_port == port:
        raise ConfigError(f"the operator port must differ from the public port ({port})")
    log_format = v["log-format"] or ("console" if os.isatty(2) else "json")
    migrate = False if args.no_migrate else env_setting("PGLEADER_MIGRATE", Switch(), True)
    lead = False if args.no_lead else env_setting("PGLEADER_LEAD", Switch(), True)
    instruments: frozenset[str] | None = v["instruments"]  # type: ignore[assignment]
    broker = str(v["broker"])
    instruments_file = Path(str(v["instruments-file"])) if v["instruments-file"] else None
    trading = None if instruments_file is None else load_instruments(instruments_file)
    if broker == "openalgo":
        if trading is None:
            raise ConfigError(
                "the openalgo broker needs an instruments file: set PGLEADER_INSTRUMENTS_FILE or --instruments-file"
            )
        if not v["openalgo-api-key"]:
            raise ConfigError(
                "the openalgo broker needs its API key: set PGLEADER_OPENALGO_API_KEY or --openalgo-api-key"
            )
    broker_timeout = float(str(v["broker-timeout"]))
    settle = float(str(v["broker-settle"]))
    if settle < 2 * broker_timeout:
        raise ConfigError(
            f"the broker settle time ({settle:g} s) must be at least twice the broker timeout"
            f" ({broker_timeout:g} s): an order may still be on its way before that"
        )
    redis_url = str(v["redis-url"] or "")
    if redis_url and (problem := redis_url_problem(redis_url)):
        raise ConfigError(f"PGLEADER_REDIS_URL (or --redis-url): {problem}")
    allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = v["allowed-ips"] or ()  # type: ignore[assignment]
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
        broker=broker,
        instruments_file=instruments_file,
        trading=trading,
        openalgo_url=str(v["openalgo-url"]),
        openalgo_api_key=str(v["openalgo-api-key"] or ""),
        openalgo_strategy=str(v["openalgo-strategy"]),
        openalgo_mode=str(v["openalgo-mode"]),
        openalgo_order_rate=float(str(v["openalgo-order-rate"])),
        broker_settle=settle,
        reorder_window=float(str(v["reorder-window"])),
        halt_action=str(v["halt-action"]),
        reconcile_interval=float(str(v["reconcile-interval"])),
        retention_days=int(str(v["retention-days"])),
        prune_instances_after=float(str(v["prune-instances-after"])),
        rollover_interval=float(str(v["rollover-interval"])),
        statistics_interval=float(str(v["statistics-interval"])),
        election=str(v["election"]),
        timings=timings,
        log_format=str(log_format),
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
        broker_timeout=broker_timeout,
        startup_timeout=float(str(v["startup-timeout"])),
        batch_interval=float(str(v["batch-interval"])),
        migrate=migrate,
        lead=lead,
        priority=int(str(v["priority"])),
        sinks=sink_settings(args),
        alert_group_interval=float(str(v["alert-group-interval"])),
        alert_timeout=float(str(v["alert-timeout"])),
        db_down_alert_after=float(str(v["db-down-alert-after"])),
        redis_url=redis_url,
    )
