"""The Helm chart rendered offline: helm and kubeconform, the values files, the manifests.

helm and kubeconform are built from the Go module proxy by scripts/helm_tools.sh (`make
helm-tools`; `make test` runs it). A missing tool fails the test with that instruction: the
chart's tests are never skipped.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HELM_DIR = REPO / "deployments" / "helm"
CHART = HELM_DIR / "smart-energy-platform"
SCHEMAS = HELM_DIR / "schemas"
VALUES = CHART / "values.yaml"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
ALL_ON = CHART / "ci" / "all-on-values.yaml"
RELEASE = "energy"
NAMESPACE = "energy-test"
# The Kubernetes version the vendored schemas are for (deployments/helm/schemas/README.md).
KUBE_VERSION = "1.34.4"
TOOL_TIMEOUT_S = 120

# The values each test renders: the defaults, and each ci/*-values.yaml on top of them.
VARIANTS: dict[str, tuple[Path, ...]] = {
    "default": (),
    **{path.name.removesuffix("-values.yaml"): (path,) for path in CI_VALUES},
}
variants = pytest.mark.parametrize("variant", list(VARIANTS))


def tool(name: str) -> str:
    """The path of helm or kubeconform: on PATH, or in Go's bin folder where
    scripts/helm_tools.sh puts them."""
    found = shutil.which(name)
    if found:
        return found
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    for folder in (os.environ.get("GOBIN"), str(Path(gopath) / "bin")):
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    pytest.fail(f"{name} is not installed: run `make helm-tools` (builds helm and kubeconform)")


def run(command: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=REPO,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


def values_args(files: tuple[Path, ...]) -> list[str]:
    return [arg for path in files for arg in ("--values", str(path))]


@functools.cache
def rendered_text(variant: str) -> str:
    """`helm template` of the chart with a variant's values."""
    result = run(
        [
            tool("helm"),
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
            *values_args(VARIANTS[variant]),
        ]
    )
    assert result.returncode == 0, f"helm template ({variant}) failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def manifests(variant: str) -> list[dict[str, Any]]:
    """The rendered objects of a variant (empty documents left out); shared, do not modify."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(rendered_text(variant), Loader=loader) if doc]


def by_kind(variant: str, kind: str) -> dict[str, dict[str, Any]]:
    """Rendered objects of one kind, by name."""
    return {doc["metadata"]["name"]: doc for doc in manifests(variant) if doc["kind"] == kind}


def name(component: str) -> str:
    """A component's resource name under the test release (<release>-<chart>-<component>)."""
    return f"{RELEASE}-smart-energy-platform-{component}"


def pod_templates(variant: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload: Deployments and Jobs."""
    for doc in manifests(variant):
        if doc["kind"] in ("Deployment", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def kubeconform(text: str) -> dict[str, Any]:
    """Validate manifests offline against the vendored schemas; kubeconform's JSON report.

    Strict (no field beyond the schema's), and without -ignore-missing-schemas: a kind with
    no vendored schema is an error.
    """
    result = run(
        [
            tool("kubeconform"),
            "-strict",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            str(SCHEMAS / "kubernetes")
            + "/{{ .NormalizedKubernetesVersion }}-standalone{{ .StrictSuffix }}"
            + "/{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location",
            str(SCHEMAS / "crds")
            + "/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json",
            "-",
        ],
        stdin=text,
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"kubeconform gave no report (exit {result.returncode}):\n{result.stderr}")
    report["returncode"] = result.returncode
    return report


def load_values(path: Path = VALUES) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        data = yaml.safe_load(stream) or {}
    assert isinstance(data, dict)
    return data
