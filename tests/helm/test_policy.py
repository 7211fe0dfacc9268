"""Policy over the rendered chart, for every values variant: what a cluster's admission
policies (Pod Security "restricted", the usual Kyverno/Gatekeeper baselines) would demand.

Every container: readiness and liveness probes (long-running ones: Jobs run to completion),
CPU and memory requests and limits, non-root, read-only root filesystem, no privilege
escalation, no privilege, every capability dropped. Every pod: no service account token, no
host namespaces. Every pod is selected by a NetworkPolicy of both directions, and only the
gateway takes connections from outside the release. No secret value sits in clear in
values.yaml or the ci/ values, and secret settings reach containers only from Secrets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import (
    CI_VALUES,
    VALUES,
    by_kind,
    load_values,
    manifests,
    name,
    pod_templates,
    variants,
)

RESOURCES = ("cpu", "memory")
# Settings that carry credentials: only ever from a Secret.
SECRET_SETTINGS = {"GATEWAY_ADMIN_TOKEN", "RABBITMQ_URL", "INGESTION_RABBITMQ_URL", "MONGODB_URL"}
# A key of values.yaml that names a secret value itself (not a Secret's name or key).
SECRET_KEY = re.compile(r"(password|passwd|token|secret|credential)s?$", re.IGNORECASE)
SECRET_NAME_KEYS = re.compile(r"(existingSecret|passwordSecret|Key|Secret)$")
URL_WITH_PASSWORD = re.compile(r"^[a-z+]+://[^/@\s]*:[^/@\s]+@", re.IGNORECASE)


def _effective(container: dict[str, Any], pod: dict[str, Any], field: str) -> Any:
    """A security field as Kubernetes applies it: the container's, else the pod's."""
    own = (container.get("securityContext") or {}).get(field)
    return own if own is not None else (pod.get("securityContext") or {}).get(field)


def _containers(variant: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(workload, its kind, container, pod spec) for every container, init containers too."""
    found = []
    for workload, pod in pod_templates(variant):
        for container in pod.get("initContainers", []) + pod["containers"]:
            kind = workload.split("/")[0]
            found.append((f"{workload}/{container['name']}", kind, container, pod))
    return found


@variants
def test_every_container_is_locked_down(variant: str) -> None:
    problems = []
    for where, _kind, container, pod in _containers(variant):
        if _effective(container, pod, "runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if _effective(container, pod, "runAsUser") == 0:
            problems.append(f"{where}: runs as uid 0")
        security = container.get("securityContext") or {}
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is writable")
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if security.get("privileged"):
            problems.append(f"{where}: privileged")
        if "ALL" not in (security.get("capabilities") or {}).get("drop", []):
            problems.append(f"{where}: capabilities not all dropped")
    assert not problems, "\n".join(problems)
    assert len(_containers(variant)) >= 4


@variants
def test_every_container_has_requests_and_limits(variant: str) -> None:
    problems = []
    for where, _kind, container, _pod in _containers(variant):
        resources = container.get("resources") or {}
        for bound in ("requests", "limits"):
            missing = [r for r in RESOURCES if r not in (resources.get(bound) or {})]
            if missing:
                problems.append(f"{where}: no {bound} for {missing}")
    assert not problems, "\n".join(problems)


@variants
def test_every_long_running_container_has_probes(variant: str) -> None:
    problems = []
    for where, kind, container, _pod in _containers(variant):
        if kind == "Job":  # runs to completion; its exit status is its health
            continue
        for probe in ("readinessProbe", "livenessProbe"):
            if not container.get(probe):
                problems.append(f"{where}: no {probe}")
    assert not problems, "\n".join(problems)


@variants
def test_grpc_services_are_ready_on_grpc_health(variant: str) -> None:
    """Readiness is gRPC health (SERVING once dependencies are up), liveness /metrics (so a
    broker outage takes a pod out of its Service without restarting it)."""
    deployments = by_kind(variant, "Deployment")
    for service in ("gateway", "ingestion", "billing"):
        (container,) = deployments[name(service)]["spec"]["template"]["spec"]["containers"]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port, service
        assert container["livenessProbe"]["httpGet"]["path"] == "/metrics", service
    (analytics,) = deployments[name("analytics")]["spec"]["template"]["spec"]["containers"]
    assert analytics["readinessProbe"]["httpGet"]["path"] == "/metrics"


@variants
def test_pods_mount_no_token_and_share_no_host_namespace(variant: str) -> None:
    for workload, pod in pod_templates(variant):
        assert pod.get("automountServiceAccountToken") is False, workload
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(field), (workload, field)
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, (workload, volume)


@variants
def test_every_pod_is_fenced_by_a_network_policy(variant: str) -> None:
    policies = list(by_kind(variant, "NetworkPolicy").values())
    if not policies:
        pytest.fail(f"{variant}: no NetworkPolicy rendered")
    for workload, pod_spec in pod_templates(variant):
        doc = next(
            d for d in manifests(variant) if f"{d['kind']}/{d['metadata']['name']}" == workload
        )
        labels = doc["spec"]["template"]["metadata"]["labels"]
        selecting = [
            p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(selecting) == 1, (workload, [p["metadata"]["name"] for p in selecting])
        assert set(selecting[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, workload
        assert pod_spec["containers"], workload


@variants
def test_only_the_gateway_takes_connections_from_outside_the_release(variant: str) -> None:
    policies = by_kind(variant, "NetworkPolicy")
    metrics_ports = {
        port["containerPort"]
        for _workload, pod in pod_templates(variant)
        for container in pod["containers"]
        for port in container.get("ports", [])
        if port["name"] == "metrics"
    }
    for policy_name, policy in policies.items():
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports <= metrics_ports:  # Prometheus, from values.networkPolicy.metricsFrom
                continue
            peers = rule.get("from")
            if policy_name == name("gateway"):
                continue  # public: anyone, or values.networkPolicy.gatewayFrom
            assert peers, f"{policy_name}: ports {ports} open to anyone"
            for peer in peers:
                selector = peer.get("podSelector", {}).get("matchLabels", {})
                assert set(peer) == {"podSelector"}, (policy_name, peer)
                assert selector.get("app.kubernetes.io/instance") == "energy", (policy_name, peer)


def _secret_values(values: Any, path: str = "") -> list[str]:
    """Dotted paths of values that hold a secret in clear: a non-empty value under a key
    named like a password or token (a Secret's name or key is fine), or a URL with a password."""
    found: list[str] = []
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict | list):
                found.extend(_secret_values(value, here))
            elif (
                SECRET_KEY.search(str(key))
                and not SECRET_NAME_KEYS.search(str(key))
                and value not in (None, "")
            ):
                found.append(here)
            elif isinstance(value, str) and URL_WITH_PASSWORD.search(value):
                found.append(here)
    elif isinstance(values, list):
        for index, item in enumerate(values):
            found.extend(_secret_values(item, f"{path}[{index}]"))
    return found


@pytest.mark.parametrize("path", [VALUES, *CI_VALUES], ids=lambda p: Path(p).name)
def test_no_secret_value_in_clear_in_the_values(path: Path) -> None:
    assert not _secret_values(load_values(path)), _secret_values(load_values(path))


def test_the_secret_check_finds_a_password_in_clear() -> None:
    assert _secret_values(
        {
            "rabbitmq": {"password": "hunter2", "existingSecret": "name-is-fine"},
            "redis": {"url": "redis://:hunter2@redis:6379/0"},
            "gateway": {"adminToken": {"key": "admin-token", "value": "x"}},
            "mongodb": {"passwordSecret": "name-is-fine"},
        }
    ) == ["rabbitmq.password", "redis.url"]


@variants
def test_secret_settings_come_only_from_secrets(variant: str) -> None:
    config_maps = by_kind(variant, "ConfigMap")
    for where, _kind, container, _pod in _containers(variant):
        for entry in container.get("env", []):
            if entry["name"] in SECRET_SETTINGS:
                assert "secretKeyRef" in entry.get("valueFrom", {}), (where, entry["name"])
            value = entry.get("value", "")
            assert not URL_WITH_PASSWORD.search(value), (where, entry["name"])
        for source in container.get("envFrom", []):
            data = config_maps[source["configMapRef"]["name"]]["data"]
            assert not set(data) & SECRET_SETTINGS, (where, set(data) & SECRET_SETTINGS)
            assert not [v for v in data.values() if URL_WITH_PASSWORD.search(v)], where
