"""Measurements the benches take of processes: which one listens on a port, its RSS and CPU
time (from /proc), a load tool's CPU time, a Prometheus sample, and py-spy profiles."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import typer
from prometheus_client.parser import text_string_to_metric_families

# The local MongoDB-wire server of make services, by its process name in /proc.
MONGODB_PROCESS = "secantusd-py"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
PROJECT_DIRS = (
    "api_gateway/",
    "ingestion_service/",
    "billing_service/",
    "analytics_service/",
    "common/",
)
# Leaves that are waiting, not working: the selector, and the event loop itself (uvloop's C
# loop shows as Runner.run, py-spy sees no deeper), and threads parked on a lock or socket.
IDLE = re.compile(
    r"^(select|epoll_wait|poll|_run_once|wait|Runner\.run|Thread\.run|_worker|accept) \("
)
# Frames every stack passes through: they say nothing about where the time goes.
ENTRY = re.compile(r"^(<module>|main|run) \((\w+_service|api_gateway|common)/(__main__|loop)\.py")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(target: str) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def pid_listening_on(port: int) -> int | None:
    """The process that listens on TCP ``port`` (from /proc; None when not found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def memory_mib(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)  # kB
    return {"peak_rss_mib": values.get("VmHWM", 0.0), "rss_mib": values.get("VmRSS", 0.0)}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_by_name() -> dict[str, float]:
    """CPU seconds so far of the servers on this machine, by process name (from /proc)."""
    found: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            values = fields[1].split()
        except (OSError, IndexError):
            continue
        found[name] = found.get(name, 0.0) + _ticks(values)
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds (user+sys) a process has used so far; 0 when it is gone."""
    try:
        return _ticks(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())
    except OSError:
        return 0.0


def _ticks(values: list[str]) -> float:
    # utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name
    return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")


def run_measured(
    command: list[str], timeout_s: float, cwd: Path | None = None
) -> tuple[str, float]:
    """Run a load tool; return its stdout+stderr and the CPU time (user+sys) it used.

    ``os.wait4`` reports the resource use of exactly that child (and its reaped children),
    so the child is reaped here rather than by ``subprocess``.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    try:
        assert process.stdout is not None
        output = process.stdout.read()
    finally:
        timer.cancel()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        process.stdout.close()  # type: ignore[union-attr]
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {process.returncode}:\n{output[-2000:]}")
    return output, usage.ru_utime + usage.ru_stime


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


def counter(url: str, name: str, labels: dict[str, str]) -> float:
    """One sample of a Prometheus text endpoint (0 when absent)."""
    with _NO_PROXY.open(url, timeout=5) as response:
        return metric_value(response.read().decode(), name, labels)


def py_spy() -> str:
    """The py-spy binary: on PATH, or next to this Python (the venv's)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise typer.BadParameter("py-spy is not installed: pip install py-spy")
    return binary


def top_costs(raw: str, count: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Self-time leaders and project functions by inclusive time, as shares of busy samples."""
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    busy = 0
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = stack.split(";")
        if IDLE.search(frames[-1]):
            continue  # waiting for I/O, not work
        samples = int(number)
        busy += samples
        leaves[frames[-1]] += samples
        for frame in set(frames):
            if any(folder in frame for folder in PROJECT_DIRS) and not ENTRY.match(frame):
                inclusive[frame] += samples
    share = lambda pairs: [(name, 100 * n / max(busy, 1)) for name, n in pairs]  # noqa: E731
    return share(leaves.most_common(count)), share(inclusive.most_common(count))


async def py_spy_record(
    pid: int, output: Path, *flags: str, rate: int, stderr: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """Start ``py-spy record`` of ``pid`` at ``rate`` Hz, raw (collapsed) stacks to ``output``;
    it stops at ``--duration`` (in ``flags``) or on SIGINT."""
    return await asyncio.create_subprocess_exec(
        py_spy(), "record", "--pid", str(pid), "--rate", str(rate), *flags,
        "--format", "raw", "--nonblocking", "--output", str(output),
        stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
    )  # fmt: skip
