"""The gateway's two Ingresses: gRPC (`ingress`) and the HTTP/JSON API and web page
(`httpIngress`), each on hosts of its own.

ingress-nginx applies an Ingress's `backend-protocol` annotation to every path of that
Ingress and takes one Ingress per host and path, so the HTTP API cannot ride on the gRPC
Ingress' host: the chart requires httpIngress.host, refuses one of ingress.hosts and a GRPC
backend protocol on the HTTP Ingress, with messages that say so.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from tests.helm.chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    VARIANTS,
    by_kind,
    kubeconform,
    load_values,
    name,
    run,
    tool,
)

BACKEND_PROTOCOL = "nginx.ingress.kubernetes.io/backend-protocol"
HTTP_HOST = "api.energy.example.com"
HOST_NEEDED = "httpIngress.host: the HTTP API and web page need a host of their own"


def _template(*settings: str) -> subprocess.CompletedProcess[str]:
    """`helm template` of the defaults with `--set` settings."""
    return run(
        [
            tool("helm"),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            *(arg for setting in settings for arg in ("--set", setting)),
        ]
    )


def _ingresses(text: str) -> dict[str, dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Ingress"}


def _route(ingress: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one rule's host and its one path."""
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    return rule["host"], path


def test_the_http_ingress_routes_the_http_port_on_a_host_of_its_own() -> None:
    ingresses = by_kind("all-on", "Ingress")
    assert set(ingresses) == {name("gateway"), name("gateway-http")}
    grpc, http = ingresses[name("gateway")], ingresses[name("gateway-http")]

    host, path = _route(http)
    assert host == HTTP_HOST
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert path["backend"]["service"] == {"name": name("gateway"), "port": {"name": "http"}}
    annotations = http["metadata"].get("annotations", {})
    assert BACKEND_PROTOCOL not in annotations, annotations
    assert http["spec"]["ingressClassName"] == "nginx"
    assert http["spec"]["tls"] == [
        {"secretName": "api-energy-example-com-tls", "hosts": [HTTP_HOST]}
    ]

    grpc_host, grpc_path = _route(grpc)
    assert grpc["metadata"]["annotations"][BACKEND_PROTOCOL] == "GRPC"
    assert grpc_path["backend"]["service"]["port"] == {"name": "grpc"}
    assert grpc_host != host, "one host cannot route / both to gRPC and to HTTP"

    # The port it names is the gateway Service's, which the NetworkPolicy opens.
    service = by_kind("all-on", "Service")[name("gateway")]
    assert "http" in {port["name"] for port in service["spec"]["ports"]}


def test_the_http_ingress_alone_validates_and_takes_the_defaults() -> None:
    """Only httpIngress on (no gRPC Ingress), with the defaults of values.yaml: a valid
    Ingress (kubeconform, strict) to the http port, nginx's body limit raised to the
    gateway's own 4 MiB, no TLS unless asked."""
    result = _template("httpIngress.enabled=true", f"httpIngress.host={HTTP_HOST}")
    assert result.returncode == 0, result.stderr
    ingresses = _ingresses(result.stdout)
    assert set(ingresses) == {name("gateway-http")}
    (http,) = ingresses.values()
    host, path = _route(http)
    assert host == HTTP_HOST
    assert path["backend"]["service"]["port"] == {"name": "http"}
    assert http["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-body-size": "4m"}
    assert "tls" not in http["spec"]

    report = kubeconform(yaml.safe_dump(http))
    assert report["returncode"] == 0, report
    assert report["summary"]["valid"] == 1, report["summary"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "all-on"])
def test_no_ingress_unless_enabled(variant: str) -> None:
    assert load_values()["httpIngress"]["enabled"] is False
    assert load_values()["httpIngress"]["host"] == ""
    assert by_kind(variant, "Ingress") == {}


def test_enabled_without_a_host_fails_saying_why() -> None:
    result = _template("httpIngress.enabled=true")
    assert result.returncode != 0
    assert HOST_NEEDED in result.stderr, result.stderr
    assert "ingress-nginx cannot route" in result.stderr


def test_the_grpc_ingress_host_is_refused() -> None:
    result = _template(
        "ingress.enabled=true",
        "ingress.hosts[0].host=energy.example.com",
        "httpIngress.enabled=true",
        "httpIngress.host=energy.example.com",
    )
    assert result.returncode != 0
    assert 'httpIngress.host "energy.example.com" is also in ingress.hosts' in result.stderr, (
        result.stderr
    )
    # The same host is fine while the gRPC Ingress is off.
    alone = _template("httpIngress.enabled=true", "httpIngress.host=energy.example.com")
    assert alone.returncode == 0, alone.stderr


@pytest.mark.parametrize("protocol", ["GRPC", "grpcs"])
def test_a_grpc_backend_on_the_http_ingress_is_refused(protocol: str) -> None:
    result = _template(
        "httpIngress.enabled=true",
        f"httpIngress.host={HTTP_HOST}",
        f"httpIngress.annotations.nginx\\.ingress\\.kubernetes\\.io/backend-protocol={protocol}",
    )
    assert result.returncode != 0
    assert "httpIngress.annotations: the HTTP API and web page are plain HTTP" in result.stderr
