"""deployments/docker-compose.yml agrees with the settings classes; the health probe works.

No Docker is needed: the compose file is validated against the compose specification and
read as YAML, and each app service's environment is fed to its settings class. The stores
are reachable from this host only, RabbitMQ has no guest user, and `make down` keeps the
volumes (checked with `make --dry-run`).
"""

from __future__ import annotations

import asyncio
import http.server
import re
import shlex
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic_settings import BaseSettings

from analytics_service.settings import AnalyticsSettings
from api_gateway.settings import GatewaySettings
from billing_service.settings import BillingSettings
from common.settings import ServiceSettings, env_names
from ingestion_service.settings import IngestionSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deployments" / "docker-compose.yml"
MAKEFILE = REPO / "Makefile"
APP_SERVICES: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "ingestion": IngestionSettings,
    "billing": BillingSettings,
    "analytics": AnalyticsSettings,
}
PORT_FIELDS = ("port", "metrics_port")
HOST_VARIABLE = {
    "gateway": "GATEWAY_HOST",
    "ingestion": "INGESTION_HOST",
    "billing": "BILLING_HOST",
    "analytics": "ANALYTICS_HOST",
}
# ${NAME}, ${NAME:-default} and ${NAME-default}: compose reads no .env here, so the default;
# ${NAME:?message}: required, so the value `make up` exports (below).
INTERPOLATION = re.compile(
    r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}"
)
EXPORTED_BY_MAKE_UP = {
    "GATEWAY_ADMIN_TOKEN": "0123456789abcdef" * 4,
    "RABBITMQ_PASSWORD": "fedcba9876543210" * 3,
}
# Servers without authentication of their own (or, for RabbitMQ, with a UI on its port).
STORES = ("rabbitmq", "mongo", "redis")
# Every make target that runs docker compose; compose interpolates the secrets for each.
COMPOSE_TARGETS = {"up", "down", "down-delete-data"}
PROBE_TIMEOUT_S = 30

app_services = pytest.mark.parametrize(
    ("service", "settings_class"), list(APP_SERVICES.items()), ids=list(APP_SERVICES)
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as data, YAML anchors and merge keys resolved."""
    with COMPOSE_FILE.open(encoding="utf-8") as stream:
        data = yaml.safe_load(stream)
    assert isinstance(data, dict)
    return data


def interpolate(value: object) -> str:
    """The value compose would pass with no variable set in the shell."""
    text = str(value)
    assert "$$" not in text, f"escaped $ not handled by this test: {text!r}"

    def value(match: re.Match[str]) -> str:
        if (match.group("op") or "").endswith("?"):
            return EXPORTED_BY_MAKE_UP[match.group("name")]
        return match.group("default") or ""

    resolved = INTERPOLATION.sub(value, text)
    assert "$" not in resolved, f"unsupported interpolation in {text!r}"
    return resolved


def environment(compose: dict[str, Any], service: str) -> dict[str, str]:
    """A service's environment as a mapping, in either of the two compose syntaxes."""
    raw = compose["services"][service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(name): interpolate(value) for name, value in raw.items()}


def container_ports(compose: dict[str, Any], service: str) -> set[int]:
    """Container ports a service publishes, from the short or the long port syntax."""
    ports: set[int] = set()
    for entry in compose["services"][service].get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/", 1)[0].rsplit(":", 1)[-1]))
    return ports


def host_addresses(compose: dict[str, Any], service: str) -> list[str]:
    """The host address each published port binds to ("" for every interface)."""
    addresses = []
    for entry in compose["services"][service].get("ports") or []:
        if isinstance(entry, dict):
            addresses.append(str(entry.get("host_ip", "")))
        else:
            parts = str(entry).split("/", 1)[0].split(":")
            addresses.append(parts[0] if len(parts) == 3 else "")
    return addresses


def make_dry_run(target: str) -> list[list[str]]:
    """The docker compose commands ``make TARGET`` would run, as argument lists."""
    result = run_in_repo(["make", "--dry-run", "--no-print-directory", target], timeout_s=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("docker")]


def build_settings(
    settings_class: type[ServiceSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> ServiceSettings:
    """Instantiate the settings with exactly ``env`` set among the variables it reads."""
    for name in env_names(settings_class):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return settings_class()


def port_fields(settings_class: type[BaseSettings]) -> list[str]:
    return [name for name in PORT_FIELDS if name in settings_class.model_fields]


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_in_repo(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def run_probe(*args: str) -> subprocess.CompletedProcess[str]:
    return run_in_repo([sys.executable, "-m", "common.healthcheck", *args], PROBE_TIMEOUT_S)


def test_compose_file_validates_against_the_compose_spec() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = run_in_repo(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)], 120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_app_services_share_one_image(compose: dict[str, Any]) -> None:
    services = compose["services"]
    images = {services[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1 and None not in images, images
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert build == {"context": "..", "dockerfile": "deployments/Dockerfile"}, name
        assert services[name]["restart"] == "unless-stopped", name


@app_services
def test_environment_names_are_read_by_the_settings(
    compose: dict[str, Any], service: str, settings_class: type[ServiceSettings]
) -> None:
    unknown = set(environment(compose, service)) - set(env_names(settings_class))
    assert not unknown, f"{service} sets variables {settings_class.__name__} never reads"


@app_services
def test_settings_build_from_the_environment(
    compose: dict[str, Any],
    service: str,
    settings_class: type[ServiceSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = build_settings(settings_class, environment(compose, service), monkeypatch)
    assert isinstance(settings, settings_class)


@app_services
def test_every_settings_port_is_published(
    compose: dict[str, Any],
    service: str,
    settings_class: type[ServiceSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = build_settings(settings_class, environment(compose, service), monkeypatch)
    published = container_ports(compose, service)
    fields = port_fields(settings_class)
    assert fields, f"{settings_class.__name__} defines no port"
    for field in fields:
        port = getattr(settings, field)
        assert port in published, f"{service}: {field}={port} not published ({published})"


@app_services
def test_service_listens_on_all_interfaces(
    compose: dict[str, Any],
    service: str,
    settings_class: type[ServiceSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = environment(compose, service)
    assert env.get(HOST_VARIABLE[service]) == "0.0.0.0"
    settings: Any = build_settings(settings_class, env, monkeypatch)
    assert settings.host == "0.0.0.0"


def test_gateway_forwards_to_the_ingestion_port(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestion = build_settings(IngestionSettings, environment(compose, "ingestion"), monkeypatch)
    gateway_env = environment(compose, "gateway")
    assert gateway_env.get("GATEWAY_INGESTION_ADDR") == f"ingestion:{ingestion.port}"
    gateway = build_settings(GatewaySettings, gateway_env, monkeypatch)
    assert isinstance(gateway, GatewaySettings)
    assert gateway.ingestion_addr == f"ingestion:{ingestion.port}"


def test_gateway_forwards_reads_to_the_billing_port(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = build_settings(BillingSettings, environment(compose, "billing"), monkeypatch)
    gateway = build_settings(GatewaySettings, environment(compose, "gateway"), monkeypatch)
    assert isinstance(gateway, GatewaySettings)
    assert gateway.billing_addr == f"billing:{billing.port}"


@app_services
def test_healthcheck_probes_the_settings_port(
    compose: dict[str, Any],
    service: str,
    settings_class: type[ServiceSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings: Any = build_settings(settings_class, environment(compose, service), monkeypatch)
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "common.healthcheck"], test
    if "port" in settings_class.model_fields:
        expected = ["grpc", f"127.0.0.1:{settings.port}"]
    else:
        expected = ["http", f"http://127.0.0.1:{settings.metrics_port}/metrics"]
    assert test[4:] == expected, test


def test_dependencies_wait_for_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {
        "ingestion": {"rabbitmq"},
        "billing": {"rabbitmq", "mongo", "redis", "seed"},
        "analytics": {"rabbitmq"},
        "gateway": {"ingestion", "billing"},
    }
    for name, dependencies in expected.items():
        depends_on = services[name]["depends_on"]
        assert set(depends_on) == dependencies, name
        for dependency in dependencies:
            if dependency == "seed":  # a one-shot job: it completes rather than turns healthy
                assert depends_on[dependency]["condition"] == "service_completed_successfully"
                continue
            assert depends_on[dependency] == {"condition": "service_healthy"}, (name, dependency)
            assert "healthcheck" in services[dependency], dependency


def test_grpc_probe_fails_on_a_closed_port() -> None:
    result = run_probe("grpc", f"127.0.0.1:{free_port()}")
    assert result.returncode != 0
    assert result.stderr.startswith("unhealthy: grpc"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def _probe_health_server(status: int) -> tuple[int, str]:
    """Serve grpc.health.v1 with ``status`` for "" and run the probe against it."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await servicer.set("", status)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "common.healthcheck",
            "grpc",
            f"127.0.0.1:{port}",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _stdout, stderr = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT_S)
        assert process.returncode is not None
        return process.returncode, stderr.decode()
    finally:
        await server.stop(None)


async def test_grpc_probe_passes_when_serving() -> None:
    returncode, stderr = await _probe_health_server(health_pb2.HealthCheckResponse.SERVING)
    assert returncode == 0, stderr


async def test_grpc_probe_fails_when_not_serving() -> None:
    returncode, stderr = await _probe_health_server(health_pb2.HealthCheckResponse.NOT_SERVING)
    assert returncode != 0
    assert "NOT_SERVING" in stderr, stderr


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """200 on /metrics, 404 elsewhere."""

    def do_GET(self) -> None:
        status = 200 if self.path == "/metrics" else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_probe_passes_on_200(http_port: int) -> None:
    result = run_probe("http", f"http://127.0.0.1:{http_port}/metrics")
    assert result.returncode == 0, result.stderr


def test_http_probe_fails_on_404(http_port: int) -> None:
    result = run_probe("http", f"http://127.0.0.1:{http_port}/missing")
    assert result.returncode != 0
    assert "status 404" in result.stderr, result.stderr


def test_http_probe_fails_on_a_closed_port() -> None:
    result = run_probe("http", f"http://127.0.0.1:{free_port()}/metrics")
    assert result.returncode != 0
    assert result.stderr.startswith("unhealthy: http"), result.stderr


def test_the_seed_job_reads_the_billing_database_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    seed = compose["services"]["seed"]
    env = environment(compose, "seed")
    assert set(env) <= set(env_names(BillingSettings)), set(env) - set(env_names(BillingSettings))
    billing_env = environment(compose, "billing")
    assert env["MONGODB_URL"] == billing_env["MONGODB_URL"]
    assert seed["restart"] == "no"
    assert seed["command"][-1] == "deployments/tariffs.yaml"
    assert Path(__file__).parents[2].joinpath(seed["command"][-1]).is_file()


def test_prometheus_and_grafana_are_wired_to_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    deployments = Path(__file__).parents[2] / "deployments"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (deployments / source).exists(), (name, source)
    config = yaml.safe_load((deployments / "prometheus" / "prometheus.yml").read_text())
    published = {
        f"{name}:{str(port).split(':')[-1]}"
        for name, service in services.items()
        for port in service.get("ports", [])
    }
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
        if not target.startswith("localhost")
    }
    assert targets <= published, targets - published
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"


def test_stores_publish_their_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    for store in STORES:
        addresses = host_addresses(compose, store)
        assert addresses, f"{store} publishes no port"
        assert set(addresses) == {"127.0.0.1"}, f"{store} binds {addresses}, not 127.0.0.1 only"


# What loggers and customers reach from other machines; everything else (internal gRPC
# without auth, /metrics, Prometheus, Grafana) binds the host's loopback only.
PUBLIC_PORTS = {("gateway", 50051), ("gateway", 8080)}


def test_only_the_gateway_s_public_ports_are_published_beyond_loopback(
    compose: dict[str, Any],
) -> None:
    for service, spec in compose["services"].items():
        ports, addresses = spec.get("ports") or [], host_addresses(compose, service)
        for entry, address in zip(ports, addresses, strict=True):
            target = int(str(entry).split("/", 1)[0].rsplit(":", 1)[-1])
            if (service, target) in PUBLIC_PORTS:
                assert address == "", f"{service}:{target} should be reachable from outside"
            else:
                assert address == "127.0.0.1", f"{service} publishes {entry} beyond loopback"


def test_rabbitmq_user_is_generated_and_not_guest(compose: dict[str, Any]) -> None:
    raw = compose["services"]["rabbitmq"].get("environment") or {}
    # Required, with no default: compose refuses to start without the generated password.
    password_source = str(raw.get("RABBITMQ_DEFAULT_PASS", ""))
    assert re.fullmatch(r"\$\{RABBITMQ_PASSWORD:\?[^}]+\}", password_source), raw
    broker = environment(compose, "rabbitmq")
    user, password = broker["RABBITMQ_DEFAULT_USER"], broker["RABBITMQ_DEFAULT_PASS"]
    assert user and user != "guest", user
    assert password == EXPORTED_BY_MAKE_UP["RABBITMQ_PASSWORD"]
    for service, settings_class in APP_SERVICES.items():
        if "RABBITMQ_URL" not in env_names(settings_class):
            continue
        url = urlsplit(environment(compose, service).get("RABBITMQ_URL", ""))
        assert (url.username, url.password, url.hostname) == (user, password, "rabbitmq"), (
            service,
            url.geturl(),
        )


def test_make_exports_every_secret_compose_requires() -> None:
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE_FILE.read_text()))
    assert required == set(EXPORTED_BY_MAKE_UP), required
    exported: dict[str, set[str]] = {}
    for line in MAKEFILE.read_text().splitlines():
        match = re.match(r"^([a-z -]+): export ([A-Z_]+) ", line)
        if match:
            exported.setdefault(match.group(2), set()).update(match.group(1).split())
    for name in required:
        assert COMPOSE_TARGETS <= exported.get(name, set()), (name, exported.get(name))


def test_make_down_keeps_the_volumes() -> None:
    (down,) = make_dry_run("down")
    assert down[:2] == ["docker", "compose"] and down[-1] == "down", down
    assert not {"-v", "--volumes"} & set(down), down
    (delete,) = make_dry_run("down-delete-data")
    assert delete[:2] == ["docker", "compose"] and "down" in delete, delete
    assert {"-v", "--volumes"} & set(delete), delete
    help_lines = {
        line.split()[1]: line
        for line in subprocess.run(
            ["make", "--no-print-directory", "help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
    }
    assert "every bill and queued reading" in help_lines["down-delete-data"]
    assert "delete" not in help_lines["down"], help_lines["down"]
