"""Regenerate the JSON schemas kubeconform validates the chart against (see README.md here).

    python deployments/helm/schemas/generate.py

Every source is a Go module from the Go module proxy, at the exact versions below
(``go mod download`` puts it in the module cache; nothing else is fetched):

* Kubernetes' own kinds come from the OpenAPI v2 document in ``k8s.io/kubernetes``
  (``api/openapi-spec/swagger.json``), converted the way ``openapi2jsonschema --kubernetes
  --stand-alone --strict`` makes yannh/kubernetes-json-schema (kubeconform's default
  schemas): every ``$ref`` inlined, ``apiVersion``/``kind`` pinned by an enum, no property
  beyond the declared ones (``additionalProperties: false``), ``int-or-string`` as a string or
  an integer, a ``Quantity`` as a string or a number.
* Custom resources come from their operators' CRD YAML, converted by kubeconform's own
  ``scripts/openapi2jsonschema.py`` (from the kubeconform module at the version
  scripts/helm_tools.sh builds).

Descriptions are dropped from both to keep the repository small; validation does not read
them.

Only the kinds the chart renders are written; a test fails if the chart renders a kind
with no schema here (kubeconform runs without ``-ignore-missing-schemas``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KUBERNETES = ("k8s.io/kubernetes", "v1.34.4")
KUBECONFORM = ("github.com/yannh/kubeconform", "v0.8.0")
# (group, version, kind) of every built-in kind the chart renders.
KINDS = (
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
    ("", "v1", "Service"),
    ("", "v1", "ServiceAccount"),
    ("apps", "v1", "Deployment"),
    ("batch", "v1", "Job"),
    ("policy", "v1", "PodDisruptionBudget"),
    ("networking.k8s.io", "v1", "NetworkPolicy"),
    ("networking.k8s.io", "v1", "Ingress"),
    ("autoscaling", "v2", "HorizontalPodAutoscaler"),
)
# module, version, CRD files in the module: the custom resources the chart renders.
CRDS = (
    (
        "github.com/kedacore/keda/v2",
        "v2.21.0",
        (
            "config/crd/bases/keda.sh_scaledobjects.yaml",
            "config/crd/bases/keda.sh_triggerauthentications.yaml",
        ),
    ),
    (
        "github.com/prometheus-operator/prometheus-operator",
        "v0.85.0",
        (
            "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
            "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
        ),
    ),
    (
        "github.com/rabbitmq/cluster-operator/v2",
        "v2.11.0",
        ("config/crd/bases/rabbitmq.com_rabbitmqclusters.yaml",),
    ),
    (
        "github.com/mongodb/mongodb-kubernetes-operator",
        "v0.9.0",
        ("config/crd/bases/mongodbcommunity.mongodb.com_mongodbcommunity.yaml",),
    ),
)
REF_PREFIX = "#/definitions/"
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"


def module_dir(module: str, version: str) -> Path:
    """The module's folder in Go's module cache, downloaded from the proxy if missing."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(result.stdout)["Dir"])


def inline(schema: Any, definitions: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """``schema`` with every ``$ref`` replaced by its definition, descriptions dropped."""
    if isinstance(schema, list):
        return [inline(item, definitions, seen) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        name = schema["$ref"].removeprefix(REF_PREFIX)
        if name in seen:
            raise ValueError(f"recursive definition {name}: not expected in the chart's kinds")
        if name == QUANTITY:  # the API takes `cpu: 1` as well as `cpu: "1"`
            return {"oneOf": [{"type": "string"}, {"type": "number"}]}
        return inline(definitions[name], definitions, (*seen, name))
    if schema.get("format") == "int-or-string":
        return {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" or key.startswith("x-kubernetes-"):
            continue
        if key == "properties":  # names, not keywords: keep a property called "description"
            out[key] = {name: inline(sub, definitions, seen) for name, sub in value.items()}
        else:
            out[key] = inline(value, definitions, seen)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False  # strict: a misspelt field is an error
    return out


def without_descriptions(schema: Any) -> Any:
    """``schema`` without its descriptions (property names kept, whatever they are)."""
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: (
            {name: without_descriptions(sub) for name, sub in value.items()}
            if key == "properties"
            else without_descriptions(value)
        )
        for key, value in schema.items()
        if key != "description"
    }


def kind_schema(definitions: dict[str, Any], group: str, version: str, kind: str) -> Any:
    """The stand-alone, strict schema of one kind."""
    for name, definition in definitions.items():
        for gvk in definition.get("x-kubernetes-group-version-kind", []):
            if (gvk["group"], gvk["version"], gvk["kind"]) == (group, version, kind):
                schema = inline(definitions[name], definitions, (name,))
                api_version = f"{group}/{version}" if group else version
                schema["properties"]["apiVersion"]["enum"] = [api_version]
                schema["properties"]["kind"]["enum"] = [kind]
                return schema
    raise KeyError(f"{group}/{version} {kind} is not in the OpenAPI document")


def file_name(group: str, version: str, kind: str) -> str:
    """kubeconform's name for it: ``{{ .ResourceKind }}{{ .KindSuffix }}.json``."""
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{kind.lower()}{suffix}.json"


def write_kubernetes() -> None:
    module, version = KUBERNETES
    spec = module_dir(module, version) / "api" / "openapi-spec" / "swagger.json"
    definitions = json.loads(spec.read_text())["definitions"]
    target = HERE / "kubernetes" / f"{version}-standalone-strict"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for group, kind_version, kind in KINDS:
        schema = kind_schema(definitions, group, kind_version, kind)
        path = target / file_name(group, kind_version, kind)
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(f"{path.relative_to(HERE)}: {module}@{version} swagger.json")


def write_crds() -> None:
    converter = module_dir(*KUBECONFORM) / "scripts" / "openapi2jsonschema.py"
    target = HERE / "crds"
    shutil.rmtree(target, ignore_errors=True)
    for module, version, files in CRDS:
        root = module_dir(module, version)
        for crd in files:
            group = Path(crd).name.split("_", 1)[0]
            out = target / group
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as work:
                # The script writes {kind}_{version}.json into its working directory.
                subprocess.run(
                    [sys.executable, str(converter), str(root / crd)],
                    cwd=work,
                    env={**os.environ, "FILENAME_FORMAT": "{kind}_{version}"},
                    check=True,
                    capture_output=True,
                )
                for written in sorted(Path(work).glob("*.json")):
                    schema = without_descriptions(json.loads(written.read_text()))
                    path = out / written.name
                    path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
                    print(f"{path.relative_to(HERE)}: {module}@{version} {crd}")


if __name__ == "__main__":
    write_kubernetes()
    write_crds()
