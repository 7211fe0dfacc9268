"""deployments/prometheus: configs and alert rules are valid and every alert is tested.

Runs promtool (installed by `make services`) on both configs, on alerts.yml, and on the
unit tests in alerts_test.yml; then checks from the YAML that every alert has a case where
it fires and one where it stays quiet, and the labels and annotations on-call needs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.prometheus_files import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    COMPOSE_CONFIG,
    LOCAL_CONFIG,
    REPO,
    alert_rules,
    alert_test_cases,
)

SEVERITIES = {"page", "ticket"}
PROMTOOL_TIMEOUT_S = 60


def promtool(*args: str | Path) -> None:
    """Run promtool from the repository root; fail with its output unless it exits 0."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: run `make services` (it installs Prometheus)")
    command = [
        path,
        *(str(Path(arg).relative_to(REPO)) if isinstance(arg, Path) else arg for arg in args),
    ]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S
    )
    assert result.returncode == 0, (
        f"{' '.join(command)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


@pytest.mark.parametrize("config", [COMPOSE_CONFIG, LOCAL_CONFIG], ids=lambda p: p.name)
def test_config_is_valid(config: Path) -> None:
    promtool("check", "config", config)


def test_alert_rules_are_valid() -> None:
    promtool("check", "rules", ALERTS_FILE)


def test_alert_unit_tests_pass() -> None:
    promtool("test", "rules", ALERTS_TEST_FILE)


def test_every_alert_fires_and_stays_quiet_in_a_test() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert names, f"no alert in {ALERTS_FILE}"
    assert len(names) == len(set(names)), f"an alert name is used twice: {names}"
    cases = alert_test_cases()
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    problems = [
        f"{name}: no case where it {what}"
        for name in names
        for what, tested in (("fires", firing), ("stays quiet (exp_alerts: [])", quiet))
        if name not in tested
    ]
    unknown = sorted((firing | quiet) - set(names))
    assert not problems and not unknown, "\n".join(
        problems + [f"{name}: tested but not in alerts.yml" for name in unknown]
    )


def test_every_alert_is_actionable() -> None:
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        if rule.get("labels", {}).get("severity") not in SEVERITIES:
            problems.append(f"{name}: labels.severity must be one of {sorted(SEVERITIES)}")
        if not rule.get("for"):
            problems.append(f"{name}: no `for:`, so one bad sample would alert")
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{name}: annotations.{key} is missing")
        if "Runbook" not in str(annotations.get("description", "")):
            problems.append(f"{name}: the description has no Runbook step")
    assert not problems, "\n".join(problems)
