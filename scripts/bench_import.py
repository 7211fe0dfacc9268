"""Benchmark of the CSV importer (not a test): rows/s, peak RSS and file size.

    python -m scripts.bench_import --rows 1000000 --target 127.0.0.1:50051
    python -m scripts.bench_import --rows 200000 --fake-gateway

Generates a CSV of --rows valid rows over --devices devices (one minute apart per device,
the last one a minute before now) in a temporary folder, streamed to disk, then imports it.
By default against the running gateway at --target (make dev: the readings go all the way
to billing). With --fake-gateway an in-process api_gateway forwards to a fake ingestion that
only counts, to measure the importer without the rest of the stack; that gateway shares
this process's CPU and memory, so both figures are conservative.
"""

from __future__ import annotations

import asyncio
import math
import resource
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import grpc
import typer

from api_gateway.app import GatewayApp
from api_gateway.settings import GatewaySettings
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from scripts.import_csv import ImportConfig, ImportSummary, import_csv

MIB = 1024 * 1024


def write_csv(path: Path, rows: int, devices: int, now: float, prefix: str = "bench") -> None:
    """Write ``rows`` valid rows, device by device within each minute, oldest minute first.

    Each device gets one reading a minute; the newest minute is the one before ``now``.
    Lines are generated and written one minute at a time, so memory stays flat.
    """
    minutes = math.ceil(rows / devices)
    first = (int(now) // 60 - minutes) * 60
    ids = [f"{prefix}-{d:05d}" for d in range(devices)]
    with path.open("w", newline="") as file:
        file.write("device_id,timestamp,usage_kwh\n")
        for step in range(minutes):
            stamp = datetime.fromtimestamp(first + step * 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            count = min(devices, rows - step * devices)
            file.writelines(
                f"{ids[d]},{stamp},{(d * 7 + step) % 100 / 1000}\n" for d in range(count)
            )


class CountingIngestion(ingestion_pb2_grpc.IngestionServicer):
    """A fake energy.v1.Ingestion that confirms every reading at once and only counts them."""

    def __init__(self) -> None:
        self.published = 0

    async def Publish(
        self, request: ingestion_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.PublishResponse:
        self.published += len(request.readings)
        return ingestion_pb2.PublishResponse(published=len(request.readings))


@asynccontextmanager
async def fake_gateway(fake: ingestion_pb2_grpc.IngestionServicer) -> AsyncIterator[str]:
    """A real GatewayApp on a free port, forwarding to ``fake``; yields its target."""
    server = grpc.aio.server()
    ingestion_pb2_grpc.add_IngestionServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Auth and rate limits off: this measures the importer and the gateway's own work.
    settings = GatewaySettings(
        port=0,
        ingestion_addr=f"127.0.0.1:{port}",
        auth_enabled=False,
        device_rate_per_s=0,
        global_rate_per_s=0,
    )
    gateway = GatewayApp(settings)
    await gateway.start()
    try:
        yield f"127.0.0.1:{gateway.port}"
    finally:
        await gateway.stop()
        await server.stop(None)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_import(config: ImportConfig, fake: bool) -> tuple[ImportSummary, int | None]:
    """Import against ``config.target``, or an in-process fake gateway; returns the summary
    and, with the fake, how many readings reached ingestion."""
    if not fake:
        return await import_csv(config), None
    ingestion = CountingIngestion()
    async with fake_gateway(ingestion) as target:
        summary = await import_csv(ImportConfig(**{**config.__dict__, "target": target}))
        return summary, ingestion.published


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help=__doc__)
def main(
    rows: Annotated[int, typer.Option(min=1, help="Rows to generate.")] = 1_000_000,
    target: Annotated[str, typer.Option(help="Gateway HOST:PORT.")] = "127.0.0.1:50051",
    devices: Annotated[int, typer.Option(min=1, help="Distinct device ids.")] = 100,
    fake_gateway_: Annotated[
        bool, typer.Option("--fake-gateway", help="In-process gateway + counting fake ingestion.")
    ] = False,
    batch: Annotated[int, typer.Option(min=1, help="Rows per SendReadings call.")] = 1000,
    streams: Annotated[int, typer.Option(min=1, help="SendReadings calls in flight.")] = 4,
) -> None:
    """Generate, import, print the figures; exit 1 unless every row was accepted."""
    mode = (
        "fake gateway (in-process api_gateway + counting fake ingestion)"
        if fake_gateway_
        else f"running gateway at {target}"
    )
    typer.echo(f"mode: {mode}")
    with tempfile.TemporaryDirectory(prefix="bench-import-") as folder:
        path = Path(folder) / "readings.csv"
        began = time.perf_counter()
        write_csv(path, rows, devices, time.time())
        size_mib = path.stat().st_size / MIB
        typer.echo(
            f"generated {rows} rows, {devices} devices: {size_mib:.1f} MiB "
            f"in {time.perf_counter() - began:.1f} s"
        )
        rss_before = peak_rss_mib()
        config = ImportConfig(path, target=target, batch=batch, streams=streams)
        summary, published = asyncio.run(run_import(config, fake_gateway_))
    typer.echo(summary.render())
    if summary.rejected:
        typer.echo(summary.report_problems(), err=True)
    rate = summary.rows_read / summary.elapsed_s if summary.elapsed_s else 0.0
    typer.echo(f"rows/s: {rate:,.0f} ({summary.rows_read} rows in {summary.elapsed_s:.2f} s)")
    typer.echo(
        f"peak RSS: {peak_rss_mib():.1f} MiB (before the import: {rss_before:.1f} MiB); "
        f"file size: {size_mib:.1f} MiB"
    )
    if published is not None:
        typer.echo(f"fake ingestion received: {published} readings")
    ok = summary.ok and summary.accepted == rows and published in (None, rows)
    raise typer.Exit(0 if ok else 1)


if __name__ == "__main__":
    app()
