"""Unary load for the bench: ghz against SendReading.

Every call carries a new reading: the device id cycles over ``devices`` ids and the
timestamp is one second later per request number, from a start that leaves the whole run
in the past (ghz fills in ``{{.RequestNumber}}`` and the sprig functions per call). The
bearer token goes in a metadata file, so it never shows on a command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import google.api

from scripts.bench.measure import run_measured

ROOT = Path(__file__).resolve().parents[2]
PROTO = "common/energy/v1/gateway.proto"
# Timestamps start this far back, one second apart: more seconds than any run has requests.
PAST_S = 3 * 86_400
# Without a broker measurement in the same run, the paced p99 is held to this.
P99_TARGET_MS = 10.0
# The paced p99 target: at most this many times the broker's own confirm p99 (PerfTest).
P99_OVER_BROKER = 2


def ghz_path() -> str:
    """ghz on PATH, else where ``go install`` put it (scripts/bench_tools.sh)."""
    found = shutil.which("ghz")
    if found:
        return found
    gopath = subprocess.run(
        ["go", "env", "GOPATH"], capture_output=True, text=True, check=False
    ).stdout.strip() or str(Path.home() / "go")
    candidate = Path(gopath) / "bin" / "ghz"
    if candidate.exists():
        return str(candidate)
    raise RuntimeError("ghz is not installed: run bash scripts/bench_tools.sh")


def googleapis_protos() -> Path:
    """The folder holding google/api/annotations.proto (googleapis-common-protos ships it),
    which gateway.proto imports for its HTTP routes."""
    return Path(google.api.__path__[0]).parents[1]


def call_data(device_prefix: str, devices: int, first_s: int) -> str:
    """The SendReadingRequest template ghz renders for each call. ghz checks that the data is
    JSON before rendering it, hence Go's raw strings (backquotes) inside the actions."""
    device = f"{device_prefix}-{{{{ mod .RequestNumber {devices} }}}}"
    stamp = f"{{{{ dateInZone `2006-01-02T15:04:05Z` (add {first_s} .RequestNumber) `UTC` }}}}"
    return f'{{"reading": {{"device_id": "{device}", "timestamp": "{stamp}", "usage_kwh": 0.01}}}}'


def run_ghz(
    target: str,
    token: str | None,
    concurrency: int,
    duration_s: float,
    device_prefix: str,
    rps: int = 0,
    devices: int = 1000,
) -> dict[str, Any]:
    """One ghz run; requests/s (OK answers only), latency percentiles and ghz's CPU time."""
    first_s = int(time.time()) - PAST_S
    with tempfile.TemporaryDirectory(prefix="bench-ghz-") as folder:
        metadata = Path(folder) / "metadata.json"
        metadata.touch(mode=0o600)
        metadata.write_text(json.dumps({"authorization": f"Bearer {token}"} if token else {}))
        report_path = Path(folder) / "report.json"
        command = [
            ghz_path(),
            "--insecure",
            "--proto",
            PROTO,
            "--import-paths",
            f"{ROOT},{googleapis_protos()}",
            "--call",
            "energy.v1.Gateway.SendReading",
            "--metadata-file",
            str(metadata),
            "--data",
            call_data(device_prefix, devices, first_s),
            "--concurrency",
            str(concurrency),
            "--duration",
            f"{duration_s:g}s",
            # Let the calls in flight at the end finish: "close" fails them as Unavailable.
            "--duration-stop",
            "wait",
            "--timeout",
            "10s",
            "--format",
            "json",
            "--output",
            str(report_path),
        ]
        if rps:
            command += ["--rps", str(rps)]
        command.append(target)
        _, cpu_s = run_measured(command, timeout_s=duration_s + 60, cwd=ROOT)
        report = json.loads(report_path.read_text())
    return summarise(report, concurrency, rps, cpu_s)


def summarise(report: dict[str, Any], concurrency: int, rps: int, cpu_s: float) -> dict[str, Any]:
    """The figures the bench keeps from a ghz JSON report (durations there are in ns)."""
    total_s = report["total"] / 1e9
    statuses = report.get("statusCodeDistribution") or {}
    ok = statuses.get("OK", 0)
    latency = {
        f"p{row['percentage']}_ms": round(row["latency"] / 1e6, 2)
        for row in report.get("latencyDistribution") or []
        if row["percentage"] in (50, 95, 99)
    }
    return {
        "tool": "ghz",
        "concurrency": concurrency,
        "rps_limit": rps or None,
        "requests": report["count"],
        "ok": ok,
        "errors": {code: n for code, n in statuses.items() if code != "OK"},
        "first_errors": dict(list((report.get("errorDistribution") or {}).items())[:3]),
        "elapsed_s": round(total_s, 3),
        "ok_per_s": round(ok / total_s) if total_s > 0 else 0,
        **latency,
        "loadgen_cpu_s": round(cpu_s, 2),
    }


def unary_section(
    target: str, token: str | None, duration_s: float, run_id: str, broker_p99_ms: float | None
) -> dict:
    """Concurrency 1, 16 and 64 flat out, then 64 callers paced (--rps) at half of what 64
    reached. The paced p99 target: at most twice the broker's own confirm p99 measured by
    PerfTest in the same run (else 10 ms)."""
    runs = [run_ghz(target, token, c, duration_s, f"{run_id}-u{c}") for c in (1, 16, 64)]
    half = max(1, runs[-1]["ok_per_s"] // 2)
    paced = run_ghz(target, token, 64, duration_s, f"{run_id}-uhalf", rps=half)
    target_ms = P99_OVER_BROKER * broker_p99_ms if broker_p99_ms else P99_TARGET_MS
    paced["p99_target_ms"] = round(target_ms, 2)
    paced["meets_p99_target"] = paced.get("p99_ms", float("inf")) <= target_ms
    return {"runs": [*runs, paced]}
