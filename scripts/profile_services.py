"""Profile the running services under load with py-spy and print each one's top costs.

    python -m scripts.profile_services --duration 20 --rate 2000 --batch 100

Finds the four services by their gRPC/metrics ports (``make dev`` defaults), runs the
simulator against the gateway, and meanwhile samples every service with
``py-spy record --format raw`` (needs root or ptrace permission). Prints, per service, the
functions where the samples land (self time) and the project functions that take the
most time including what they call, and keeps the raw stacks (flame-graph input) in
``--out``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from scripts.simulate import FleetConfig, run_fleet

SERVICES = {  # a port each listens on, to find its process
    "api_gateway": 50051,
    "ingestion_service": 50052,
    "billing_service": 50053,
    "analytics_service": 9100,
}
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


def py_spy() -> str:
    """The py-spy binary: on PATH, or next to this Python (the venv's)."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise typer.BadParameter("py-spy is not installed: pip install py-spy")
    return binary


def pid_listening_on(port: int) -> int | None:
    output = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    found = re.search(r"pid=(\d+)", output.stdout)
    return int(found.group(1)) if found else None


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


async def profile(duration_s: float, rate: float, batch: int, target: str, out: Path) -> None:
    binary = py_spy()
    recorders = {}
    for service, port in SERVICES.items():
        pid = pid_listening_on(port)
        if pid is None:
            typer.echo(f"{service}: nothing listens on :{port}; start the services (make dev)")
            continue
        recorders[service] = await asyncio.create_subprocess_exec(
            binary, "record", "--pid", str(pid), "--duration", str(int(duration_s)),
            "--rate", "200", "--format", "raw", "--nonblocking",
            "--output", str(out / f"{service}.txt"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    config = FleetConfig(
        devices=1000,
        rate=rate,
        duration_s=duration_s,
        target=target,
        batch=batch,
        device_prefix="profile",
        show_progress=False,
        token=os.environ.get("GATEWAY_TOKEN"),
    )
    summary = await run_fleet(config)
    typer.echo(summary.render())
    for service, recorder in recorders.items():
        _, errors = await recorder.communicate()
        path = out / f"{service}.txt"
        if recorder.returncode != 0:
            typer.echo(f"{service}: py-spy failed: {errors.decode().strip()[-300:]}")
            continue
        leaves, project = top_costs(path.read_text())  # noqa: ASYNC240 - the run is over
        typer.echo(f"\n{service}: where the busy samples land (self)")
        for name, percent in leaves:
            typer.echo(f"  {percent:5.1f}%  {name}")
        typer.echo(f"{service}: project functions, including what they call")
        for name, percent in project:
            typer.echo(f"  {percent:5.1f}%  {name}")


def main(
    duration_s: Annotated[float, typer.Option("--duration", min=2, help="Seconds.")] = 20,
    rate: Annotated[float, typer.Option(min=1, help="Readings/s of the load.")] = 2000,
    batch: Annotated[int, typer.Option(min=0, help="0: unary; N: SendReadings of N.")] = 100,
    target: Annotated[str, typer.Option(help="Gateway HOST:PORT.")] = "127.0.0.1:50051",
    out: Annotated[Path, typer.Option(help="Folder for the raw stacks.")] = Path("profiles"),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(profile(duration_s, rate, batch, target, out))


if __name__ == "__main__":
    typer.run(main)
