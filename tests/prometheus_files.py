"""deployments/prometheus as data, for the unit tests and the end-to-end test.

Plain functions (no pytest fixtures): the alert rules of alerts.yml and the test cases of
alerts_test.yml, read with PyYAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deployments" / "prometheus"
COMPOSE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
LOCAL_CONFIG = PROMETHEUS_DIR / "prometheus.local.yml"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_FILE = PROMETHEUS_DIR / "alerts_test.yml"


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as stream:
        return yaml.safe_load(stream)


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of alerts.yml (recording rules left out), in file order."""
    return [
        rule for group in _load(ALERTS_FILE)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def alert_expressions() -> dict[str, str]:
    """Alert name -> its PromQL expression, as written in alerts.yml."""
    return {rule["alert"]: rule["expr"].strip() for rule in alert_rules()}


def alert_test_cases() -> list[dict[str, Any]]:
    """Every alert_rule_test case of alerts_test.yml: alertname, eval_time, exp_alerts."""
    return [
        case
        for test in _load(ALERTS_TEST_FILE)["tests"]
        for case in test.get("alert_rule_test") or []
    ]
