"""The chart's environment agrees with the services' settings classes, as
tests/unit/test_compose.py checks for docker compose.

For every container of the image (the four Deployments and the seed Job), in every values
variant: each variable it gets (its env entries and the keys of the ConfigMaps it loads) is
one its settings class reads; the settings build from that environment (Secrets stood in
for); the ports the settings listen on are the container's ports, its probes' and its
Service's; the gateway and analytics dial the Services of ingestion and billing.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_settings import BaseSettings

from analytics_service.settings import AnalyticsSettings
from api_gateway.settings import GatewaySettings
from billing_service.settings import BillingSettings
from common.settings import env_names
from ingestion_service.settings import IngestionSettings
from tests.helm.chart import by_kind, name, pod_templates, variants

# The settings class each module of the image reads (the seed script reads billing's
# database settings, as compose's seed service does).
SETTINGS: dict[str, type[BaseSettings]] = {
    "api_gateway": GatewaySettings,
    "ingestion_service": IngestionSettings,
    "billing_service": BillingSettings,
    "analytics_service": AnalyticsSettings,
    "scripts.seed": BillingSettings,
}
# Stand-ins for values that come from Secrets, valid for the settings' patterns.
SECRET_STAND_INS = {
    "GATEWAY_ADMIN_TOKEN": "0123456789abcdef" * 4,
    "RABBITMQ_URL": "amqp://user:password@rabbitmq:5672/",
    "MONGODB_URL": "mongodb://user:password@mongodb-0,mongodb-1/admin?replicaSet=rs0",
    "REDIS_URL": "redis://:password@redis:6379/0",
}


def _app_containers(variant: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, container) of every container that runs the project's image."""
    found = []
    for workload, pod in pod_templates(variant):
        for container in pod["containers"]:
            if container.get("command", [])[:2] == ["python", "-m"]:
                found.append((f"{workload}/{container['name']}", container))
    return found


def _module(container: dict[str, Any]) -> str:
    return str(container["command"][2])


def environment(variant: str, container: dict[str, Any]) -> dict[str, str]:
    """The variables a container starts with: ConfigMaps it loads, then its env entries
    (a Secret's value replaced by a stand-in)."""
    config_maps = by_kind(variant, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, source
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            assert set(entry["valueFrom"]) == {"secretKeyRef"}, entry
            env[entry["name"]] = SECRET_STAND_INS[entry["name"]]
        else:
            env[entry["name"]] = str(entry["value"])
    return env


def build(
    settings_class: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Instantiate the settings with exactly ``env`` set among the variables it reads."""
    for variable in env_names(settings_class):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    return settings_class()


@variants
def test_every_variable_is_one_the_settings_read(variant: str) -> None:
    containers = _app_containers(variant)
    assert {_module(c) for _, c in containers} >= set(SETTINGS) - {"scripts.seed"}
    problems = []
    for where, container in containers:
        settings_class = SETTINGS[_module(container)]
        unknown = set(environment(variant, container)) - set(env_names(settings_class))
        if unknown:
            problems.append(f"{where}: {sorted(unknown)} not read by {settings_class.__name__}")
    assert not problems, "\n".join(problems)


@variants
def test_settings_build_from_the_chart_environment(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for where, container in _app_containers(variant):
        settings = build(SETTINGS[_module(container)], environment(variant, container), monkeypatch)
        if where.startswith("Deployment/"):  # reachable from the pod's network
            assert settings.host == "0.0.0.0", where


@variants
def test_ports_agree_with_settings_probes_and_services(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = by_kind(variant, "Service")
    for where, container in _app_containers(variant):
        if where.startswith("Job/"):
            continue
        settings = build(SETTINGS[_module(container)], environment(variant, container), monkeypatch)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == settings.metrics_port, where
        if "grpc" in ports:
            assert ports["grpc"] == settings.port, where
            assert container["readinessProbe"]["grpc"]["port"] == settings.port, where
        component = where.split("/")[1].removeprefix(name(""))
        service = services[name(component)]
        targets = {p["targetPort"] for p in service["spec"]["ports"]}
        assert {"metrics"} | ({"grpc"} if "grpc" in ports else set()) <= targets, where


@variants
def test_callers_dial_the_services_of_ingestion_and_billing(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = by_kind(variant, "Service")

    def service_port(component: str) -> str:
        spec = services[name(component)]["spec"]
        grpc = next(p["port"] for p in spec["ports"] if p["name"] == "grpc")
        return f"{name(component)}:{grpc}"

    containers = {_module(c): c for _, c in _app_containers(variant)}
    gateway = build(GatewaySettings, environment(variant, containers["api_gateway"]), monkeypatch)
    assert gateway.ingestion_addr == service_port("ingestion")
    assert gateway.billing_addr == service_port("billing")
    analytics = build(
        AnalyticsSettings, environment(variant, containers["analytics_service"]), monkeypatch
    )
    assert analytics.billing_addr == service_port("billing")


@variants
def test_every_service_of_the_image_reads_the_same_stores(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Billing, the gateway and the seed Job share one database and one Redis key space."""
    seen: dict[str, set[str]] = {"mongodb_database": set(), "redis_key_prefix": set()}
    for _where, container in _app_containers(variant):
        settings = build(SETTINGS[_module(container)], environment(variant, container), monkeypatch)
        for field, values in seen.items():
            if hasattr(settings, field):
                values.add(getattr(settings, field))
    assert all(len(values) == 1 for values in seen.values()), seen
