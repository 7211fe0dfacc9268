"""make bench, smallest useful run: the broker baselines and the unary path, on its own stack.

Needs ghz and PerfTest, which ``make bench-tools`` installs (``make test`` and ``make bench``
run it first).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.bench.broker import PERF_TEST_LIB, PERF_TEST_VERSION
from scripts.bench.unary import ghz_path

ROOT = Path(__file__).parents[2]


def _tools_missing() -> str | None:
    try:
        ghz_path()
    except RuntimeError as error:
        return str(error)
    if not (PERF_TEST_LIB / f"perf-test-{PERF_TEST_VERSION}.jar").exists():
        return f"PerfTest is not in {PERF_TEST_LIB}: run bash scripts/bench_tools.sh"
    return None


@pytest.mark.timeout(120)
def test_quick_bench_reports_positive_figures(tmp_path: Path) -> None:
    missing = _tools_missing()
    assert missing is None, missing
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "scripts.bench", "all", "--quick", "--only", "broker,unary"]
    run = subprocess.run(
        [*command, "--own-stack", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["errors"] == {}
    assert results["machine"]["logical_cpus"] > 0
    broker = results["broker"]
    for figure in (broker["aio_pika"], broker["perf_test"]):
        assert figure["publish_per_s"] > 0 and figure["consume_per_s"] > 0
    runs = results["unary"]["runs"]
    assert [r["concurrency"] for r in runs] == [1, 16, 64, 64]
    assert runs[-1]["rps_limit"] == max(1, runs[2]["ok_per_s"] // 2)
    for figure in runs:
        assert figure["ok_per_s"] > 0 and figure["p99_ms"] > 0 and figure["loadgen_cpu_s"] > 0
    # The broker alone at the paced run's rate, beside it.
    paced = results["unary"]["broker_paced"]
    assert paced["rate_limit"] == runs[-1]["rps_limit"] and paced["publish_per_s"] > 0
    assert paced["confirm_latency_us"]["p99"] > 0
    assert "the broker alone at that rate" in run.stdout
    assert set(results["memory"]) == {
        "api_gateway",
        "ingestion_service",
        "billing_service",
        "analytics_service",
    }
    assert all(m["peak_rss_mib"] > 0 for m in results["memory"].values())
    assert "x broker" in run.stdout  # the table came before the JSON
