"""Benchmark of the CSV importer (not a test): rows/s, peak RSS and file size.

    python -m scripts.bench import --rows 1000000 --target 127.0.0.1:50051
    python -m scripts.bench import --rows 200000 --fake-gateway

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
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from scripts import client_options as client
from scripts.bench.fakes import CountingIngestion, fake_gateway
from scripts.bench.measure import peak_rss_mib
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


async def run_import(config: ImportConfig, fake: bool) -> tuple[ImportSummary, int | None]:
    """Import against ``config.target``, or an in-process fake gateway; returns the summary
    and, with the fake, how many readings reached ingestion."""
    if not fake:
        return await import_csv(config), None
    ingestion = CountingIngestion()
    async with fake_gateway(ingestion) as target:
        summary = await import_csv(replace(config, target=target, tls=None))
        return summary, ingestion.published


def main(
    rows: Annotated[int, typer.Option(min=1, help="Rows to generate.")] = 1_000_000,
    target: client.Target = client.DEFAULT_TARGET,
    devices: Annotated[int, typer.Option(min=1, help="Distinct device ids.")] = 100,
    fake_gateway_: Annotated[
        bool, typer.Option("--fake-gateway", help="In-process gateway + counting fake ingestion.")
    ] = False,
    batch: Annotated[int, typer.Option(min=1, help="Rows per SendReadings call.")] = 1000,
    streams: Annotated[int, typer.Option(min=1, help="SendReadings calls in flight.")] = 4,
    token: client.Token = None,
    tls_ca: client.TlsCa = None,
    tls_cert: client.TlsCert = None,
    tls_key: client.TlsKey = None,
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
        tls = client.client_tls(tls_ca, tls_cert, tls_key)
        config = ImportConfig(
            path, target=target, batch=batch, streams=streams, token=token, tls=tls
        )
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
