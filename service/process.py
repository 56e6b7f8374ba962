"""Process wiring: `pgleader serve` builds one gateway instance and runs it.

Parse nothing here (service.config did), decide nothing (service.gateway does):
set up logging, bind both listeners before anything else (a port in use fails in
one line), start an embedded PostgreSQL when no DSN is given, start the Gateway,
serve the public and the operator's apps, and on SIGTERM drain, resign, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal

import structlog
from aiohttp import web

from pgleader.connect import describe_dsn
from pgleader.embedded import EmbeddedPostgres, cluster_dir
from pgleader.logs import configure_logging
from service.config import ServiceConfig
from service.gateway import Gateway
from service.web.listener import (
    GuardedSite,
    Limits,
    Rejections,
    bind,
    runner,
)
from service.web.metrics import Metrics
from service.web.routes import build_operator_app, build_public_app

__all__ = ["serve"]

log = structlog.get_logger("service")


async def serve(config: ServiceConfig) -> int:
    """Run one instance until SIGTERM/SIGINT; then drain, resign, close, exit 0."""
    configure_logging("console" if config.log_format == "console" else "json")
    structlog.contextvars.bind_contextvars(instance=config.instance_id)
    # Bind first: a port in use fails here, in one line, before the election is joined.
    public_sock = bind(config.host, config.port, "public listener")
    try:
        operator_sock = bind(config.operator_host, config.operator_port, "operator listener")
    except BaseException:
        public_sock.close()
        raise
    embedded: EmbeddedPostgres | None = None
    dsn = config.dsn
    if dsn is None:
        embedded = EmbeddedPostgres(cluster_dir(config.data_dir), port=config.embedded_port)
        where = {"cluster": str(embedded.data_dir), "port": embedded.port}
        if embedded.data_dir.parent != config.data_dir.resolve():
            # As root, with a data directory the postgres user cannot reach (a checkout in
            # /root): the cluster lives where it can, and stays there between runs.
            where["why"] = "the postgres user cannot reach the data directory"
        if embedded.is_running():
            embedded = None  # another instance of ours started it: share, do not stop it
            dsn = f"host=127.0.0.1 port={config.embedded_port} user=postgres dbname=postgres"
            log.info("embedded PostgreSQL already running: shared", **where)
        else:
            dsn = embedded.start()
            log.info("embedded PostgreSQL started", **where)
    gateway = Gateway(config, dsn)
    limits = Limits(
        max_connections=config.max_connections,
        request_timeout=config.request_timeout,
        max_body_bytes=config.max_body_bytes,
    )
    rejections = Rejections()
    metrics = Metrics(gateway, rejections)  # one registry for the process, both listeners
    runners: list[web.AppRunner] = []
    try:
        await gateway.start()
        for name, app, sock in (
            ("public", build_public_app(gateway, limits, rejections, metrics), public_sock),
            ("operator", build_operator_app(gateway, limits, rejections, metrics), operator_sock),
        ):
            guarded = runner(
                app,
                request_timeout=config.request_timeout,
                shutdown_timeout=config.shutdown_timeout,
            )
            await guarded.setup()
            runners.append(guarded)
            await GuardedSite(guarded, sock, name, limits, rejections).start()
        # Before "serving" is announced: a SIGTERM sent on reading it must drain, not kill.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "serving", url=f"http://{config.host}:{config.port}",
            operator_url=f"http://{config.operator_host}:{config.operator_port}",
            database=describe_dsn(dsn),
        )  # fmt: skip
        print(
            json.dumps({
                "event": "serving", "host": config.host, "port": config.port,
                "operator_host": config.operator_host, "operator_port": config.operator_port,
            }),
            flush=True,
        )  # fmt: skip
        await stop.wait()
        log.info("shutting down: draining requests, then resigning")
        gateway.shutting_down = True
        gateway.status.close()  # open status pages end their streams: nothing to wait for
        while runners:  # stop accepting; in-flight requests get shutdown_timeout
            await runners.pop().cleanup()
        await gateway.stop()
        return 0
    finally:
        for leftover in runners:
            await leftover.cleanup()
        public_sock.close()
        operator_sock.close()
        if not gateway.shutting_down:
            with contextlib.suppress(Exception):
                await gateway.stop()
        if embedded is not None:
            embedded.stop("fast")
