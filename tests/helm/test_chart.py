"""deployments/helm/smart-energy-platform: lint, render, validate offline, and what it wires.

No cluster runs here: `helm lint` and `helm template` with the default values and with each
ci/*-values.yaml (ci/all-on-values.yaml turns every optional part on), then kubeconform
against the vendored Kubernetes and CRD schemas (KEDA, prometheus-operator, RabbitMQ Cluster
Operator, MongoDB Community Operator). The rest reads the rendered objects: KEDA scales on
ready + unacked messages of the services' own queues, the HPAs and ScaledObjects own
different Deployments, Prometheus' job names and rules match deployments/prometheus, the
dashboards are the files of deployments/grafana.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from common.rabbit import Topology
from tests.helm.chart import (
    ALL_ON,
    CHART,
    KUBE_VERSION,
    REPO,
    VARIANTS,
    by_kind,
    kubeconform,
    load_values,
    manifests,
    name,
    rendered_text,
    run,
    tool,
    values_args,
    variants,
)

SERVICES = ("gateway", "ingestion", "billing", "analytics")
PROMETHEUS_CONFIG = REPO / "deployments" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "deployments" / "prometheus" / "alerts.yml"
DASHBOARDS = REPO / "deployments" / "grafana" / "dashboards"


@variants
def test_helm_lint_passes(variant: str) -> None:
    result = run(
        [
            tool("helm"),
            "lint",
            "--strict",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            *values_args(VARIANTS[variant]),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout, result.stdout


@variants
def test_rendered_manifests_validate_against_the_schemas(variant: str) -> None:
    report = kubeconform(rendered_text(variant))
    summary = report["summary"]
    problems = [
        f"{r['kind']}/{r['name']}: {r['status']}: {r.get('msg', '')}"
        for r in report.get("resources", [])
    ]
    assert report["returncode"] == 0, "\n".join(problems)
    assert summary["invalid"] == 0 and summary["errors"] == 0 and summary["skipped"] == 0, problems
    assert summary["valid"] == len(manifests(variant)), summary


def test_kubeconform_rejects_a_misspelt_field_and_a_wrong_type() -> None:
    """The validation has teeth: a typo in a Deployment and a string where a CRD wants an
    integer are both reported (strict schemas, CRD schemas applied)."""
    text = rendered_text("all-on")
    broken = text.replace("readinessProbe:", "readinesProbe:", 1).replace(
        "minReplicaCount: 1", 'minReplicaCount: "1"', 1
    )
    assert broken != text
    report = kubeconform(broken)
    invalid = {(r["kind"], r["status"]) for r in report["resources"]}
    assert ("Deployment", "statusInvalid") in invalid, report
    assert ("ScaledObject", "statusInvalid") in invalid, report
    assert report["returncode"] != 0


def _enabled_switches(values: Any, path: str = "") -> list[str]:
    """Dotted paths of every `enabled` switch in a values tree."""
    found: list[str] = []
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{path}.{key}" if path else key
            if key == "enabled" and isinstance(value, bool):
                found.append(path)
            else:
                found.extend(_enabled_switches(value, here))
    return found


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merged(base[key], value)
        else:
            out[key] = value
    return out


def test_the_all_on_values_turn_every_optional_part_on() -> None:
    defaults = load_values()
    all_on = _merged(defaults, load_values(ALL_ON))
    switches = _enabled_switches(defaults)
    assert len(switches) >= 10, switches
    off = [path for path in switches if not _lookup(all_on, f"{path}.enabled")]
    assert not off, f"ci/all-on-values.yaml leaves these off: {off}"
    assert all_on["metrics"]["mode"] == "serviceMonitor"
    kinds = {doc["kind"] for doc in manifests("all-on")}
    assert {
        "RabbitmqCluster",
        "MongoDBCommunity",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PrometheusRule",
        "Ingress",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Job",
    } <= kinds, kinds


def test_the_defaults_need_no_crd() -> None:
    """The default install runs on a bare cluster: only built-in kinds."""
    groups = {doc["apiVersion"].rsplit("/", 1)[0] for doc in manifests("default")}
    assert groups <= {"v1", "apps", "batch", "policy", "networking.k8s.io", "autoscaling"}, groups


@variants
def test_every_service_has_a_deployment_from_the_one_image(variant: str) -> None:
    deployments = by_kind(variant, "Deployment")
    images = set()
    for service in SERVICES:
        (container,) = deployments[name(service)]["spec"]["template"]["spec"]["containers"]
        images.add(container["image"])
        module = {"gateway": "api_gateway"}.get(service, f"{service}_service")
        assert container["command"] == ["python", "-m", module], container["command"]
    assert len(images) == 1, images


@variants
def test_every_pod_is_covered_by_a_pod_disruption_budget(variant: str) -> None:
    budgets = by_kind(variant, "PodDisruptionBudget")
    for service in SERVICES:
        budget = budgets[name(service)]["spec"]
        assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == service
        assert "maxUnavailable" in budget or "minAvailable" in budget, budget


def test_keda_scales_billing_and_analytics_on_ready_and_unacked_messages() -> None:
    values = _merged(load_values(), load_values(ALL_ON))
    topology = Topology(values["topologyPrefix"])
    queues = {"billing": topology.billing_queue, "analytics": topology.analytics_queue}
    scaled = by_kind("all-on", "ScaledObject")
    assert set(scaled) == {name("billing"), name("analytics")}
    auth = by_kind("all-on", "TriggerAuthentication")
    secrets = by_kind("all-on", "RabbitmqCluster")
    for service, queue in queues.items():
        spec = scaled[name(service)]["spec"]
        assert spec["scaleTargetRef"]["name"] == name(service)
        scaling = values[service]["autoscaling"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (
            scaling["minReplicas"],
            scaling["maxReplicas"],
        )
        assert spec["cooldownPeriod"] == scaling["cooldownPeriodSeconds"]
        behaviour = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert (
            behaviour["scaleDown"]["stabilizationWindowSeconds"]
            == (scaling["scaleDownStabilizationSeconds"])
        )
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "rabbitmq"
        # The management API: `messages` counts unacked deliveries too (AMQP: ready only).
        assert meta["protocol"] == "http" and meta["host"].startswith("http://"), meta
        assert "@" not in meta["host"], "credentials belong in the TriggerAuthentication"
        assert meta["mode"] == "QueueLength"
        assert meta.get("excludeUnacknowledged", "false") == "false"
        assert meta["queueName"] == queue
        assert meta["value"] == str(scaling["messagesPerReplica"])
        assert trigger["authenticationRef"]["name"] in auth
    (authentication,) = auth.values()
    parameters = {ref["parameter"]: ref for ref in authentication["spec"]["secretTargetRef"]}
    assert set(parameters) == {"username", "password"}
    (cluster,) = secrets
    assert {ref["name"] for ref in parameters.values()} == {f"{cluster}-default-user"}


@pytest.mark.parametrize("variant", ["default", "all-on"])
def test_autoscalers_own_their_deployments_replicas(variant: str) -> None:
    """An HPA on CPU for gateway and ingestion; KEDA (when on) for billing and analytics;
    never two on one Deployment, and no fixed replica count where one scales."""
    deployments = by_kind(variant, "Deployment")
    hpas = {
        doc["spec"]["scaleTargetRef"]["name"]: doc
        for doc in by_kind(variant, "HorizontalPodAutoscaler").values()
    }
    keda = {
        doc["spec"]["scaleTargetRef"]["name"] for doc in by_kind(variant, "ScaledObject").values()
    }
    assert set(hpas) == {name("gateway"), name("ingestion")}
    assert not set(hpas) & keda
    for target in hpas:
        (metric,) = hpas[target]["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
    for target in set(hpas) | keda:
        assert "replicas" not in deployments[target]["spec"], target
    if variant == "all-on":
        assert keda == {name("billing"), name("analytics")}
    else:
        assert not keda
        for service in ("billing", "analytics"):
            assert deployments[name(service)]["spec"]["replicas"] >= 1


def test_service_monitors_keep_the_job_names_of_prometheus_yml() -> None:
    """Alert rules and dashboards select by job (`up{job="billing"}`): the ServiceMonitors
    relabel to the same names as deployments/prometheus/prometheus.yml."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    expected = {job["job_name"] for job in config["scrape_configs"]} - {"mongodb", "prometheus"}
    jobs = set()
    for monitor in by_kind("all-on", "ServiceMonitor").values():
        (endpoint,) = monitor["spec"]["endpoints"]
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        jobs.add(relabel["replacement"])
    assert jobs == expected, (jobs, expected)
    rabbitmq = by_kind("all-on", "ServiceMonitor")[name("rabbitmq")]
    assert rabbitmq["spec"]["endpoints"][0]["path"] == "/metrics/per-object"


def test_alert_rules_are_deployments_prometheus_alerts_yml() -> None:
    alerts = yaml.safe_load(ALERTS.read_text())
    (rule,) = by_kind("all-on", "PrometheusRule").values()
    assert rule["spec"] == alerts
    (config_map,) = [
        doc for n, doc in by_kind("default", "ConfigMap").items() if n == name("alert-rules")
    ]
    assert yaml.safe_load(config_map["data"]["alerts.yml"]) == alerts


@pytest.mark.parametrize("variant", ["default", "all-on"])
def test_dashboards_are_the_grafana_files(variant: str) -> None:
    files = {path.name: json.loads(path.read_text()) for path in DASHBOARDS.glob("*.json")}
    shipped = {}
    for config_map in by_kind(variant, "ConfigMap").values():
        if config_map["metadata"]["labels"].get("grafana_dashboard") == "1":
            ((file, text),) = config_map["data"].items()
            shipped[file] = json.loads(text)
    assert shipped == files


def test_annotations_mode_scrapes_every_metrics_port() -> None:
    for deployment in by_kind("default", "Deployment").values():
        template = deployment["spec"]["template"]
        annotations = template["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", deployment["metadata"]["name"]
        ports = {
            str(port["containerPort"])
            for container in template["spec"]["containers"]
            for port in container.get("ports", [])
            if port["name"] == "metrics"
        }
        assert annotations["prometheus.io/port"] in ports
    assert not by_kind("default", "ServiceMonitor")


def test_the_gateway_is_the_only_service_exposed() -> None:
    services = by_kind("all-on", "Service")
    assert services[name("gateway")]["spec"]["type"] == "LoadBalancer"
    for service_name, service in services.items():
        if service_name != name("gateway"):
            assert service["spec"]["type"] == "ClusterIP", service_name
    ingress = by_kind("all-on", "Ingress")[name("gateway")]  # gRPC; test_ingress: HTTP's
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": name("gateway"), "port": {"name": "grpc"}}
    assert ingress["spec"]["tls"], "gRPC over an Ingress needs HTTP/2, so TLS"
    ports = {p["name"] for p in services[name("gateway")]["spec"]["ports"]}
    assert ports == {"grpc", "http", "metrics"}


def test_generated_secrets_are_random_not_from_values() -> None:
    """The admin token and MongoDB password the chart generates differ on every render
    (helm template has no cluster to look the kept ones up in): they come from no file."""
    first = by_kind("all-on", "Secret")
    assert set(first) == {name("mongodb-password")}, "all-on names its own admin token Secret"
    second = yaml.safe_load_all(
        run(
            [
                tool("helm"),
                "template",
                "energy",
                str(CHART),
                "--kube-version",
                KUBE_VERSION,
                *values_args(VARIANTS["all-on"]),
            ]
        ).stdout
    )
    again = {d["metadata"]["name"]: d for d in second if d and d["kind"] == "Secret"}
    for secret_name, secret in first.items():
        assert secret["data"] != again[secret_name]["data"], secret_name
        assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (token,) = by_kind("default", "Secret").values()
    assert token["metadata"]["name"] == name("admin-token")


def test_rabbitmq_and_mongodb_on_their_operators() -> None:
    (cluster,) = by_kind("all-on", "RabbitmqCluster").values()
    assert cluster["spec"]["replicas"] == 3
    anti = cluster["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"]
    (mongodb,) = by_kind("all-on", "MongoDBCommunity").values()
    assert mongodb["spec"]["type"] == "ReplicaSet" and mongodb["spec"]["members"] == 3
    (user,) = mongodb["spec"]["users"]
    assert user["roles"] == [{"name": "readWrite", "db": "energy"}]
    assert user["passwordSecretRef"]["name"] == name("mongodb-password")
    deployment = by_kind("all-on", "Deployment")[name("billing")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    # The Secrets the operators write (names from their code: see templates/_helpers.tpl).
    assert refs["RABBITMQ_URL"] == {
        "name": f"{cluster['metadata']['name']}-default-user",
        "key": "connection_string",
    }
    assert refs["MONGODB_URL"] == {
        "name": f"{mongodb['metadata']['name']}-admin-{user['name']}",
        "key": "connectionString.standard",
    }


def test_redis_keeps_nothing_on_disk() -> None:
    redis = by_kind("default", "Deployment")[name("redis")]
    (server, _exporter) = redis["spec"]["template"]["spec"]["containers"]
    assert server["args"][:4] == ["--save", "", "--appendonly", "no"]
    volumes = redis["spec"]["template"]["spec"]["volumes"]
    assert all("emptyDir" in volume for volume in volumes), volumes
