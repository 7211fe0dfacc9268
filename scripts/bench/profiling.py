"""Profile the running services under load with py-spy and print each one's top costs.

    python -m scripts.bench profile --duration 20 --rate 2000 --batch 100

Finds the four services by their gRPC/metrics ports (``make dev`` defaults), runs the
simulator against the gateway, and meanwhile samples every service with
``py-spy record --format raw`` (needs root or ptrace permission). Prints, per service, the
functions where the samples land (self time) and the project functions that take the
most time including what they call, and keeps the raw stacks (flame-graph input) in
``--out``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from scripts import client_options as client
from scripts.bench.loaded import DEFAULT_LISTEN_PORTS
from scripts.bench.measure import pid_listening_on, py_spy_record, top_costs
from scripts.simulate import FleetConfig, run_fleet


async def profile(
    duration_s: float, rate: float, batch: int, target: str, token: str | None, out: Path
) -> None:
    recorders = {}
    for service, port in DEFAULT_LISTEN_PORTS.items():
        pid = pid_listening_on(port)
        if pid is None:
            typer.echo(f"{service}: nothing listens on :{port}; start the services (make dev)")
            continue
        recorders[service] = await py_spy_record(
            pid, out / f"{service}.txt", "--duration", str(int(duration_s)), rate=200
        )
    config = FleetConfig(
        devices=1000,
        rate=rate,
        duration_s=duration_s,
        target=target,
        batch=batch,
        device_prefix="profile",
        show_progress=False,
        token=token,
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
    target: client.Target = client.DEFAULT_TARGET,
    token: client.Token = None,
    out: Annotated[Path, typer.Option(help="Folder for the raw stacks.")] = Path("profiles"),
) -> None:
    """py-spy every running service under simulated load; print each one's top costs."""
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(profile(duration_s, rate, batch, target, token, out))
