"""The deployment files agree with each other and with the real CLI.

No container engine runs here, so these tests read compose.yaml, the Dockerfile
and deploy/haproxy.cfg: a renamed flag or variable, a gateway missing from the
load balancer, a shared spool volume or a root image fails the suite.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from pgleader.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
LB_CONFIG = ROOT / "deploy" / "haproxy.cfg"
LB_CONFIG_IN_CONTAINER = "/usr/local/etc/haproxy/haproxy.cfg"
TRADINGVIEW_BUDGET_S = 3.0


# --- compose.yaml -------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def gateways(services: dict[str, Any]) -> dict[str, Any]:
    """The services built from this project."""
    return {name: svc for name, svc in services.items() if "build" in svc}


@pytest.fixture(scope="module")
def lb(services: dict[str, Any]) -> dict[str, Any]:
    return services["lb"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message}, resolved against `env`."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = env.get(name)
        unset = value is None or (value == "" and op.startswith(":"))
        if op.endswith("-"):
            return arg if unset else value
        if op.endswith("?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return re.sub(r"\$\{(?P<name>\w+)(?P<op>:?[-?]|)(?P<arg>[^}]*)\}", one, text)


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume, short or long syntax."""
    result = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result.append(
                (volume.get("source", ""), volume["target"], bool(volume.get("read_only")))
            )
        else:
            source, target, *mode = volume.split(":")
            result.append((source, target, "ro" in "".join(mode).split(",")))
    return result


def published_container_ports(service: dict[str, Any]) -> list[int]:
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            assert port.get("published"), f"port {port} is not published"
            ports.append(int(port["target"]))
        else:
            parts = str(port).split(":")
            assert len(parts) >= 2, f"port {port} is not published on a fixed host port"
            ports.append(int(parts[-1].split("/")[0]))
    return ports


def compose_seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- the CLI ------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return verbs.choices["serve"]


def parse_cli(command: list[str]) -> argparse.Namespace:
    try:
        return build_parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"`pgleader {' '.join(command)}` is refused by the CLI parser")


def variables_the_cli_reads() -> set[str]:
    """PGLEADER_<FLAG> for every --flag of `serve` that takes a value, and the variable
    each flag's help names (--no-migrate's twin is PGLEADER_MIGRATE)."""
    known = {"PGLEADER_DSN"}
    for action in serve_parser()._actions:
        known.update(re.findall(r"\bPGLEADER_[A-Z_]+", action.help or ""))
        if action.nargs == 0:
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                known.add("PGLEADER_" + option[2:].upper().replace("-", "_"))
    return known


# --- deploy/haproxy.cfg -------------------------------------------------------


def haproxy_sections() -> dict[str, list[list[str]]]:
    """Section header ("backend gateways_ready") -> its directives, as token lists,
    as written (quotes and "${VAR}" kept)."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in LB_CONFIG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(line.split())
    return sections


def haproxy_defaults(sections: dict[str, list[list[str]]]) -> dict[str, str]:
    """The variables the global section gives a default (presetenv: the environment wins)."""
    return {tokens[1]: tokens[2] for tokens in directive(sections["global"], "presetenv")}


def haproxy_variables(sections: dict[str, list[list[str]]]) -> set[str]:
    """Every "${VAR}" the file reads."""
    return {
        name
        for body in sections.values()
        for tokens in body
        for token in tokens
        for name in re.findall(r"\$\{(\w+)\}", token)
    }


@pytest.fixture(scope="module")
def haproxy(lb: dict[str, Any]) -> dict[str, list[list[str]]]:
    """deploy/haproxy.cfg as HAProxy reads it in the lb container: "${VAR}" expanded
    from the service's environment over the file's own defaults."""
    sections = haproxy_sections()
    env = haproxy_defaults(sections) | {
        key: interpolate(value, {}) for key, value in environment(lb).items()
    }

    def expand(token: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: env[m[1]], token.strip('"'))

    return {
        name: [[expand(token) for token in tokens] for tokens in body]
        for name, body in sections.items()
    }


def directive(section: list[list[str]], *words: str) -> list[list[str]]:
    return [tokens for tokens in section if tokens[: len(words)] == list(words)]


def backends(haproxy: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
    return {name.split()[1]: body for name, body in haproxy.items() if name.startswith("backend ")}


def frontends(haproxy: dict[str, list[list[str]]]) -> dict[str, list[list[str]]]:
    return {name.split()[1]: body for name, body in haproxy.items() if name.startswith("frontend ")}


def public_frontend(haproxy: dict[str, list[list[str]]]) -> list[list[str]]:
    """The frontend that routes to the gateways (the other one routes nowhere)."""
    (frontend,) = [
        body for body in frontends(haproxy).values() if directive(body, "default_backend")
    ]
    return frontend


def bound_port(bind: list[str]) -> int:
    return int(bind[1].rsplit(":", 1)[1])


def servers(backend: list[list[str]]) -> dict[str, int]:
    """host -> port of each `server NAME HOST:PORT ...` line."""
    targets = {}
    for tokens in directive(backend, "server"):
        host, port = tokens[2].rsplit(":", 1)
        targets[host] = int(port)
    return targets


def haproxy_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value).groups()
    return (
        int(number) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit or "ms"]
    )


# --- Dockerfile ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def instructions(dockerfile: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in dockerfile if instruction == name]


# --- compose.yaml: the services -----------------------------------------------


def test_compose_runs_postgres_three_gateways_and_a_load_balancer(compose, services, gateways):
    assert "version" not in compose, "the Compose spec has no top-level version"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert sorted(gateways) == ["gateway1", "gateway2", "gateway3"]
    assert "lb" in services
    assert set(services) == {"postgres", "lb", *gateways}


def test_every_gateway_command_is_a_serve_the_cli_accepts(gateways, haproxy):
    instance_ids = []
    for name, gateway in gateways.items():
        args = parse_cli(gateway["command"])
        assert args.verb == "serve", name
        assert args.host == "0.0.0.0", f"{name} must listen on every interface of its container"
        for backend_name, backend in backends(haproxy).items():
            assert servers(backend).get(name) == args.port, (
                f"{backend_name} must target {name} on the port it listens on ({args.port})"
            )
        instance_ids.append(args.instance_id)
    assert None not in instance_ids
    assert len(set(instance_ids)) == len(instance_ids), f"instance ids repeat: {instance_ids}"


def test_every_pgleader_variable_in_compose_is_one_the_cli_reads(services):
    known = variables_the_cli_reads()
    for name, service in services.items():
        # The load balancer is HAProxy: its variables are its config's (test below).
        reader = haproxy_variables(haproxy_sections()) if name == "lb" else known
        unknown = {key for key in environment(service) if key.startswith("PGLEADER_")} - reader
        assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"


def test_every_variable_of_the_load_balancer_config_has_a_default():
    """HAProxy starts from compose.yaml as it is: the file sets its own defaults for
    the compose network, and a test (test_haproxy.py) overrides them all."""
    sections = haproxy_sections()
    assert haproxy_variables(sections) == set(haproxy_defaults(sections))
    assert all(name.startswith("PGLEADER_LB_") for name in haproxy_defaults(sections))


def test_gateways_reach_the_postgres_service_with_its_password(services, gateways):
    for env in ({}, {"POSTGRES_PASSWORD": "s3cret @:/x"}):
        password = interpolate(environment(services["postgres"])["POSTGRES_PASSWORD"], env)
        for name, gateway in gateways.items():
            params = conninfo_to_dict(interpolate(environment(gateway)["PGLEADER_DSN"], env))
            assert params["host"] == "postgres", name
            assert int(params.get("port", 5432)) == 5432, name
            assert params["user"] == "postgres", name
            assert params["password"] == password, f"{name}'s DSN password drifted from postgres"


def test_gateways_refuse_to_start_without_a_webhook_secret(gateways):
    for name, gateway in gateways.items():
        secret = environment(gateway).get("PGLEADER_WEBHOOK_SECRET")
        assert secret, f"{name} has no PGLEADER_WEBHOOK_SECRET"
        with pytest.raises(MissingVariable):
            interpolate(secret, {})
        assert interpolate(secret, {"PGLEADER_WEBHOOK_SECRET": "abc"}) == "abc"


def test_gateways_share_one_configuration(gateways):
    first, *others = gateways.values()
    for gateway in others:
        assert environment(gateway) == environment(first)
        assert gateway["build"] == first["build"]
        assert gateway.get("healthcheck") == first.get("healthcheck")


def test_each_gateway_waits_for_a_healthy_postgres_and_reports_ready(services, gateways):
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name, gateway in gateways.items():
        assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy", name
        # On the operator's listener: the public one's allow-list may refuse 127.0.0.1.
        port = parse_cli(gateway["command"]).operator_port
        check = " ".join(gateway["healthcheck"]["test"])
        assert f":{port}/ready" in check, f"{name}'s healthcheck must ask /ready on port {port}"


def test_each_gateway_keeps_its_spool_on_its_own_named_volume(compose, gateways):
    declared = set(compose.get("volumes") or {})
    sources = []
    for name, gateway in gateways.items():
        data_dir = environment(gateway)["PGLEADER_DATA_DIR"]
        on_data_dir = [source for source, target, _ in mounts(gateway) if target == data_dir]
        assert len(on_data_dir) == 1, f"{name} has no volume on {data_dir}"
        assert on_data_dir[0] in declared, f"{name}'s {on_data_dir[0]} is not a named volume"
        sources.append(on_data_dir[0])
    assert len(set(sources)) == len(sources), f"gateways share a spool volume: {sources}"


def test_gateways_get_time_to_drain_before_being_killed(gateways):
    for name, gateway in gateways.items():
        assert compose_seconds(gateway["stop_grace_period"]) >= 35, name


# --- the load balancer --------------------------------------------------------


def test_load_balancer_config_is_mounted_read_only(lb):
    assert LB_CONFIG.is_file()
    assert lb["image"].startswith("haproxy:")
    assert any(
        (ROOT / source).resolve() == LB_CONFIG and target == LB_CONFIG_IN_CONTAINER and read_only
        for source, target, read_only in mounts(lb)
    ), f"deploy/haproxy.cfg must be mounted read-only at {LB_CONFIG_IN_CONTAINER}"


def test_load_balancer_publishes_the_ports_it_listens_on(lb, haproxy):
    bound = {
        bound_port(tokens)
        for body in frontends(haproxy).values()
        for tokens in directive(body, "bind")
    }
    published = published_container_ports(lb)
    assert published, "the load balancer publishes no port"
    assert set(published) == bound, f"published {published}, HAProxy binds {bound}"


def test_load_balancer_terminates_tls_on_443_with_the_mounted_certificate(lb, haproxy):
    (bind,) = directive(public_frontend(haproxy), "bind")
    assert bound_port(bind) == 443, "TradingView posts only to ports 80 and 443"
    assert "ssl" in bind, "the webhook frontend must terminate TLS"
    certificate = Path(bind[bind.index("crt") + 1])
    mounted = {
        target: (ROOT / source).resolve() for source, target, read_only in mounts(lb) if read_only
    }
    folder = mounted.get(str(certificate.parent))
    assert folder is not None, f"no read-only mount holds {certificate}"
    assert folder.is_relative_to(ROOT / "deploy") and folder.is_dir(), folder
    assert f"{folder.relative_to(ROOT)}/*.pem" in (ROOT / ".gitignore").read_text().split(), (
        "private keys must stay out of git"
    )


def test_plain_http_on_80_is_refused_never_redirected(haproxy):
    """TradingView does not follow a redirect of its POST: a redirect loses the signal."""
    public = public_frontend(haproxy)
    (plain,) = [body for body in frontends(haproxy).values() if body is not public]
    (bind,) = directive(plain, "bind")
    assert bound_port(bind) == 80 and "ssl" not in bind
    # Nothing on 80 reaches a gateway: HAProxy itself answers every request with a 4xx.
    assert not directive(plain, "default_backend") and not directive(plain, "use_backend")
    (answer,) = directive(plain, "http-request")
    assert answer[1:3] == ["return", "status"] and 400 <= int(answer[3]) < 500, answer
    assert not {"if", "unless"} & set(answer), "every request on 80 must be refused"
    redirects = [
        tokens
        for body in haproxy.values()
        for tokens in body
        if "redirect" in tokens[:2] or any(re.fullmatch(r"30[1-8]", t) for t in tokens)
    ]
    assert not redirects, redirects


def test_load_balancer_sends_traffic_only_to_gateways_whose_ready_answers_200(haproxy, gateways):
    (default,) = directive(public_frontend(haproxy), "default_backend")
    backend = backends(haproxy)[default[1]]
    assert directive(backend, "option", "httpchk")
    (send,) = directive(backend, "http-check", "send")
    assert send[send.index("uri") + 1] == "/ready"
    assert ["http-check", "expect", "status", "200"] in backend
    assert set(servers(backend)) == set(gateways)
    server_options = [
        tokens
        for section in (haproxy["defaults"], backend)
        for tokens in directive(section, "default-server") + directive(section, "server")
    ]
    assert any("check" in tokens for tokens in server_options), "health checks are not enabled"


def test_load_balancer_passes_the_client_address_on(haproxy):
    assert directive(haproxy["defaults"], "option", "forwardfor")


def test_load_balancer_answers_within_tradingviews_budget(haproxy):
    defaults = haproxy["defaults"]
    timeout = {tokens[1]: haproxy_seconds(tokens[2]) for tokens in directive(defaults, "timeout")}
    (retries,) = directive(defaults, "retries")
    worst = timeout["connect"] * (int(retries[1]) + 1) + timeout["server"]
    assert timeout["server"] <= 2.5
    assert worst < TRADINGVIEW_BUDGET_S, f"worst case {worst:.2f} s"
    # A retry after a response timeout would double the wait and miss the budget.
    for tokens in directive(defaults, "retry-on"):
        assert "response-timeout" not in tokens and "all-retryable-errors" not in tokens


# --- Dockerfile ---------------------------------------------------------------


def test_image_runs_pgleader_as_a_non_root_user(dockerfile):
    assert instructions(dockerfile, "FROM")[-1].startswith("python:3.11-slim")
    assert [json.loads(e) for e in instructions(dockerfile, "ENTRYPOINT")][-1] == ["pgleader"]
    cmd = json.loads(instructions(dockerfile, "CMD")[-1])
    assert parse_cli(cmd).verb == "serve"
    users = instructions(dockerfile, "USER")
    assert users, "the image runs as root: add a USER line"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert "/health" in instructions(dockerfile, "HEALTHCHECK")[-1]


def test_the_image_installs_the_extra_that_pgleader_redis_url_needs(dockerfile):
    """Without it, an image started with PGLEADER_REDIS_URL refuses to start."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "redis" in extras
    installs = [args for args in instructions(dockerfile, "RUN") if "pip install" in args]
    assert any(re.search(r"['\"]?\.\[([\w,]*,)?redis(,[\w,]*)?\]", args) for args in installs), (
        installs
    )


def test_every_pgleader_variable_in_the_image_is_one_the_cli_reads(dockerfile):
    set_by_image = {
        key
        for args in instructions(dockerfile, "ENV")
        for key in re.findall(r"(\w+)=", args)
        if key.startswith("PGLEADER_")
    }
    assert set_by_image <= variables_the_cli_reads()


def test_image_exposes_the_port_the_gateways_listen_on(dockerfile, gateways):
    exposed = {
        int(p.split("/")[0]) for args in instructions(dockerfile, "EXPOSE") for p in args.split()
    }
    for name, gateway in gateways.items():
        args = parse_cli(gateway["command"])
        assert {args.port, args.operator_port} <= exposed, name


def test_no_gateway_publishes_a_port_only_the_load_balancer_does(services, gateways):
    """The operator's listener (signals, metrics, coordinator) stays on the compose
    network; the outside reaches the public listener through HAProxy only."""
    for name, gateway in gateways.items():
        assert not gateway.get("ports"), f"{name} publishes {gateway['ports']}"
        args = parse_cli(gateway["command"])
        assert args.operator_host == "0.0.0.0" and args.operator_port != args.port, name


def test_secrets_and_local_state_stay_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".env"} <= ignored
