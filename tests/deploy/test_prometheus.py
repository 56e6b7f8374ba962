"""/metrics to Prometheus' standard, the alert rules and the dashboard, with the real
tools: `promtool check metrics` on a live instance, `promtool check rules` and
`promtool test rules` on deploy/prometheus/, and a real Prometheus scraping a live
three-instance cluster with the shipped scrape config and rules, against which
every panel query of deploy/grafana/pgleader.json runs.

The Debian package `prometheus` brings both binaries; `make test` installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from pgleader.embedded import EmbeddedPostgres, free_port
from tests.support.gateway import Cluster, GatewayProcess, cluster, signal_body, until
from tests.support.metrics import samples, value
from tests.support.redis import redis_server

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "pgleader.json"

# What an operator needs (issue 15), by the names /metrics gives them.
FAMILIES = {
    "pgleader_is_leader", "pgleader_epoch", "pgleader_leadership_transitions_total",
    "pgleader_heartbeat_duration_seconds_bucket", "pgleader_heartbeats_total",
    "pgleader_seconds_since_heartbeat", "pgleader_evictions_total",
    "gateway_http_request_duration_seconds_bucket", "gateway_webhook_answers_total",
    "gateway_executions_total", "gateway_signals", "gateway_signal_oldest_age_seconds",
    "gateway_webhook_invalid_total",
    "gateway_signal_execution_latency_seconds_bucket", "gateway_broker_requests_total",
    "gateway_broker_request_duration_seconds_bucket", "gateway_broker_orders_total",
    "gateway_spooled_signals", "gateway_inbox_write_seconds_bucket",
    "gateway_db_pool_connections", "gateway_db_pool_requests_waiting",
    "pgleader_job_runs_total", "pgleader_job_seconds_since_success", "gateway_trading_halt",
    "gateway_last_reconciliation", "gateway_alert_deliveries_total", "gateway_redis_operations_total",
    "pgleader_build_info", "process_cpu_seconds_total",
    "process_resident_memory_bytes", "python_info",
}  # fmt: skip


def tool(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(found).exists(), (
        f"{name} is not installed: `make test` installs it (Debian: prometheus)"
    )
    return found


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


async def scrape(http: aiohttp.ClientSession, node: GatewayProcess) -> str:
    async with http.get(f"{node.operator_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


# --- the rules -----------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_and_each_has_a_unit_test_that_fires_it():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    fired = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert rules == fired
    assert {"PgleaderNoLeader", "PgleaderSeveralLeaders", "PgleaderLeadershipFlapping",
            "PgleaderHeartbeatFailures", "GatewaySpoolNotEmpty", "GatewaySignalInDoubt",
            "GatewayReconciliationMismatch", "GatewayBrokerUnauthorised", "GatewayHalted",
            "GatewayWebhookSlow", "GatewayWebhookInvalid", "GatewaySignalStuck"} <= rules  # fmt: skip
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
            assert rule["annotations"]["runbook"], rule["alert"]


def test_the_shipped_scrape_config_is_valid_and_scrapes_the_three_gateways():
    checked = promtool("check", "config", str(SCRAPE_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (job,) = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]
    (targets,) = job["static_configs"]
    assert targets["targets"] == ["gateway1:9080", "gateway2:9080", "gateway3:9080"]


# --- a live cluster --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def prometheus(nodes: list[GatewayProcess], tmp_path: Path) -> AsyncIterator[str]:
    """A real Prometheus with the shipped scrape config and rules, its targets the
    nodes' operator listeners, scraping and evaluating every second."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{n.operator_port}" for n in nodes]}
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def is_ready() -> bool:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{url}/-/ready") as resp:
                        return resp.status == 200
                return False

            await until(is_ready, timeout=30)
        yield url
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def api(http: aiohttp.ClientSession, url: str, path: str, **params: str) -> Any:
    async with http.get(f"{url}/api/v1/{path}", params=params) as resp:
        answer = await resp.json()
    assert answer["status"] == "success", answer
    return answer["data"]


async def query(http: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    """An instant query's series; a query Prometheus rejects fails the test."""
    return (await api(http, url, "query", query=promql))["result"]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel, with Grafana's variables as a query
    over all instances would have them."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "15s").replace("$instance", ".*")
            assert "$" not in expr.replace("{{", ""), (panel["title"], expr)
            queries.append((panel["title"], expr))
    return queries


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:pgleader|gateway|process|python)_[a-z_]+)\b", expr))


async def test_metrics_and_dashboard_against_a_real_prometheus_scraping_three_instances(
    dsn: str, tmp_path: Path
):
    # With the optional Redis: its panel reads a family only an instance using it has.
    with redis_server() as redis:
        await _metrics_and_dashboard(dsn, tmp_path, {"PGLEADER_REDIS_URL": redis.url})


async def _metrics_and_dashboard(dsn: str, tmp_path: Path, env: dict[str, str]) -> None:
    async with cluster(dsn, tmp_path) as gw:
        nodes = await gw.start(3, env=env)
        leader = await gw.leader()
        status, answer = await gw.post(leader, signal_body())
        assert (status, answer["status"]) in ((200, "executed"), (202, "accepted")), answer
        await gw.settled([answer["signal_id"]])
        # A refused request too (a wrong secret): the dashboard has a panel for those.
        assert (await gw.post(nodes[2], signal_body(secret="wrong")))[0] == 401

        # The exposition itself: Prometheus' linter finds nothing, every family is there.
        text = await scrape(gw.http, leader)
        linted = promtool("check", "metrics", stdin=text)
        assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout
        await until(lambda: _has(gw, leader, "gateway_signals"), timeout=20)  # counted every 5 s
        text = await scrape(gw.http, leader)
        names = {name for name, _ in samples(text)}
        assert names >= FAMILIES, sorted(FAMILIES - names)

        async with prometheus(nodes, tmp_path) as url, aiohttp.ClientSession() as http:
            wanted = set().union(*(metric_names(q) for _, q in panel_queries()))

            async def scraped_all() -> bool:
                up = await query(http, url, 'sum(up{job="pgleader"})')
                known = set(await api(http, url, "label/__name__/values"))
                return bool(up) and float(up[0]["value"][1]) == 3 and wanted <= known

            try:
                await until(scraped_all, timeout=30)
            except TimeoutError:
                up = await query(http, url, 'up{job="pgleader"}')
                known = set(await api(http, url, "label/__name__/values"))
                raise AssertionError(f"up: {up}; not scraped: {sorted(wanted - known)}") from None
            for _, promql in panel_queries():
                await query(http, url, promql)
            # The Leader panel names the leader, and no other instance.
            (leader_query,) = [q for t, q in panel_queries() if t == "Leader"]
            (series,) = await query(http, url, leader_query)
            assert series["metric"]["instance"] == f"127.0.0.1:{leader.operator_port}"

            async def rules_evaluated() -> bool:
                groups = (await api(http, url, "rules"))["groups"]
                rules = [r for g in groups for r in g["rules"]]
                return len(rules) == 14 and all(r["health"] == "ok" for r in rules)

            await until(rules_evaluated, timeout=30)
            # A healthy cluster raises none of them.
            alerts = (await api(http, url, "alerts"))["alerts"]
            assert [a["labels"]["alertname"] for a in alerts if a["state"] == "firing"] == []
            # A webhook with the right secret and a bad field pages, from its first one
            # (the counter is there at 0 before it, so the increase is seen).
            status, refused = await gw.post(nodes[1], signal_body(lots="two"))
            assert (status, refused["field"]) == (400, "lots"), refused

            async def invalid_paged() -> bool:
                alerts = (await api(http, url, "alerts"))["alerts"]
                return any(a["labels"]["alertname"] == "GatewayWebhookInvalid"
                           and a["state"] == "firing" for a in alerts)  # fmt: skip

            await until(invalid_paged, timeout=30)


async def _has(gw: Cluster, node: GatewayProcess, name: str) -> bool:
    return any(n == name for n, _ in samples(await scrape(gw.http, node)))


async def test_metrics_answer_at_once_while_the_database_is_down(
    own_server: EmbeddedPostgres, tmp_path: Path
):
    async with cluster(own_server.dsn, tmp_path) as gw:
        (node,) = await gw.start(1)
        await gw.leader()
        before = await scrape(gw.http, node)
        own_server.stop("immediate")
        try:

            async def stepped_down() -> bool:
                return value(await scrape(gw.http, node), "pgleader_is_leader",
                             election="gateway") == 0  # fmt: skip

            await until(stepped_down, timeout=20)
            began = time.monotonic()
            text = await scrape(gw.http, node)
            took = time.monotonic() - began
        finally:
            own_server.start()
        assert took < 1.0, f"/metrics took {took:.2f} s with the database down"
        linted = promtool("check", "metrics", stdin=text)
        assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout
        failed = value(text, "pgleader_heartbeats_total", election="gateway", result="failed")
        assert failed is not None and failed >= 1
        assert value(text, "pgleader_leadership_transitions_total", election="gateway",
                     kind="demoted") == 1  # fmt: skip
        # The database's count is the last one, and says how old it is.
        age = value(text, "gateway_signals_count_age_seconds")
        assert age is not None and age > (value(before, "gateway_signals_count_age_seconds") or 0)
