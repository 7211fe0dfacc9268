"""The Grafana provisioning files and dashboards are well-formed and query only known metrics.

No Grafana or Prometheus is needed; running the queries against a real Prometheus is another
test's job. promtool, when installed, checks that every expression parses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboards import (
    DASHBOARDS_DIR,
    DASHBOARDS_MOUNT,
    DATASOURCE_UID,
    DATASOURCES_FILE,
    GRAFANA_DIR,
    KNOWN_METRICS,
    PROVIDERS_FILE,
    ROOT,
    dashboards,
    metric_names,
    panel_queries,
    query_panels,
)

EXPECTED_UIDS = {
    "energy-overview.json": "energy-overview",
    "pipeline-health.json": "pipeline-health",
    "rabbitmq-redis.json": "rabbitmq-redis",
}
PANEL_TYPES = {"timeseries", "stat", "table", "bargauge"}
COMPOSE_FILE = ROOT / "deployments" / "docker-compose.yml"


def _panels() -> list[tuple[str, dict[str, Any]]]:
    return [
        (board["uid"], panel) for board in dashboards().values() for panel in query_panels(board)
    ]


def _panel_id(item: tuple[str, dict[str, Any]]) -> str:
    uid, panel = item
    return f"{uid}:{panel.get('title', panel.get('id'))}"


PANELS = _panels()
QUERIES = panel_queries()


def test_every_dashboard_file_is_valid_json() -> None:
    import json

    files = sorted(DASHBOARDS_DIR.glob("*.json"))
    assert {path.name for path in files} == set(EXPECTED_UIDS)
    for path in files:
        assert isinstance(json.loads(path.read_text(encoding="utf-8")), dict), path.name


def test_uids_are_unique_and_as_expected() -> None:
    boards = dashboards()
    assert {name: board.get("uid") for name, board in boards.items()} == EXPECTED_UIDS
    assert len({board["uid"] for board in boards.values()}) == len(boards)


@pytest.mark.parametrize("name", sorted(EXPECTED_UIDS))
def test_dashboard_model(name: str) -> None:
    board = dashboards()[name]
    assert board.get("title")
    assert board.get("schemaVersion") == 39
    assert board.get("id") is None  # provisioned dashboards must not pin a database id
    panels = list(query_panels(board))
    assert panels, "a dashboard without panels"
    ids = [panel.get("id") for panel in board["panels"]] + [
        nested.get("id") for panel in board["panels"] for nested in panel.get("panels", [])
    ]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        pos = panel.get("gridPos", {})
        assert {"x", "y", "w", "h"} <= pos.keys(), panel.get("title")
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel.get("title")


@pytest.mark.parametrize("item", PANELS, ids=[_panel_id(item) for item in PANELS])
def test_panel_is_complete(item: tuple[str, dict[str, Any]]) -> None:
    _uid, panel = item
    assert panel.get("type") in PANEL_TYPES
    assert panel.get("title", "").strip()
    assert len(panel.get("description", "").strip()) >= 40, (
        "describe what it shows and what good is"
    )
    assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit"), "set a unit"
    assert panel.get("datasource") == {"type": "prometheus", "uid": DATASOURCE_UID}
    targets = panel.get("targets", [])
    assert targets, "a panel without a query"
    ref_ids = [target.get("refId") for target in targets]
    assert all(ref_ids) and len(ref_ids) == len(set(ref_ids))
    for target in targets:
        assert target.get("datasource") == {"type": "prometheus", "uid": DATASOURCE_UID}
        assert target.get("expr", "").strip(), "empty expr"
        assert "legendFormat" in target


def test_panel_titles_are_unique_per_dashboard() -> None:
    for board in dashboards().values():
        titles = [panel["title"] for panel in query_panels(board)]
        assert len(titles) == len(set(titles)), board["uid"]


@pytest.mark.parametrize("query", QUERIES, ids=[f"{uid}:{title}" for uid, title, _ in QUERIES])
def test_query_uses_known_metrics_only(query: tuple[str, str, str]) -> None:
    _uid, _title, expr = query
    assert "$" not in expr, "only $__rate_interval may be used"
    names = metric_names(expr)
    assert names, "no metric in the expression"
    assert names <= KNOWN_METRICS, f"unknown metrics: {sorted(names - KNOWN_METRICS)}"
    for opening, closing in ("()", "{}", "[]"):
        assert expr.count(opening) == expr.count(closing), f"unbalanced {opening}{closing}"


def test_metric_names_parser() -> None:
    expr = (
        'sum by (reason) (rate(ingestion_publish_failures_total{job="x",queue=~"a(b)"}[1m]))'
        ' or on() label_replace(vector(0), "reason", "none", "", "")'
        " / clamp_min(sum(rabbitmq_channels), 1e-9) * 3600"
    )
    assert metric_names(expr) == {"ingestion_publish_failures_total", "rabbitmq_channels"}
    assert metric_names("histogram_quantile(0.95, sum by (le) (rate(up[5m])))") == {"up"}


def test_every_panel_of_every_dashboard_is_queried() -> None:
    panels_with_targets = sum(len(panel["targets"]) for _uid, panel in PANELS)
    assert len(QUERIES) == panels_with_targets
    assert {uid for uid, _title, _expr in QUERIES} == set(EXPECTED_UIDS.values())


def test_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run `make services`"
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": expr}
                    for index, (_uid, _title, expr) in enumerate(QUERIES)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_provisioning() -> None:
    config = yaml.safe_load(DATASOURCES_FILE.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    assert source["editable"] is False


def test_dashboard_provider_loads_the_mounted_folder() -> None:
    config = yaml.safe_load(PROVIDERS_FILE.read_text(encoding="utf-8"))
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "Smart energy"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT


def _volumes(service: dict[str, Any]) -> dict[str, Path]:
    """Container target -> host source (resolved against the compose file) of bind mounts."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) < 2:
                continue
            source, target = parts[0], parts[1]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source.startswith((".", "/")):
            mounts[target.rstrip("/")] = (COMPOSE_FILE.parent / source).resolve()
    return mounts


def test_compose_mounts_the_dashboards_where_the_provider_looks() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    grafana = next(
        (
            service
            for name, service in (compose.get("services") or {}).items()
            if name == "grafana" or re.search(r"grafana", str(service.get("image", "")))
        ),
        None,
    )
    assert grafana is not None, "deployments/docker-compose.yml has no grafana service"
    mounts = _volumes(grafana)
    provider_path = yaml.safe_load(PROVIDERS_FILE.read_text(encoding="utf-8"))["providers"][0][
        "options"
    ]["path"]
    assert mounts.get(provider_path.rstrip("/")) == DASHBOARDS_DIR.resolve(), mounts
    provisioning = (GRAFANA_DIR / "provisioning").resolve()
    whole = mounts.get("/etc/grafana/provisioning") == provisioning
    split = all(
        mounts.get(f"/etc/grafana/provisioning/{kind}") == provisioning / kind
        for kind in ("datasources", "dashboards")
    )
    assert whole or split, mounts
