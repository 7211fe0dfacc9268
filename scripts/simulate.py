"""A fleet of virtual loggers sending readings to the gateway at a steady rate.

    python -m scripts.simulate --devices 50 --rate 200 --duration 30 --target 127.0.0.1:50051

Readings lie in the past on a grid of --interval-s seconds and carry no reading_id, so the
gateway derives it: a rerun within the same window resends the same readings, billed once.
"""

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from itertools import islice
from typing import Annotated, TextIO

import grpc
import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.models import derive_reading_id
from scripts import client_options as client


@dataclass(frozen=True)
class FleetConfig:
    """What to simulate; the CLI options map one to one onto these fields."""

    devices: int = 50
    rate: float = 200.0
    duration_s: float = 30.0
    target: str = client.DEFAULT_TARGET
    batch: int = 0
    interval_s: int = 60
    seed: int | None = None
    concurrency: int = 64
    timeout_s: float = 10.0
    device_prefix: str = "sim"
    show_progress: bool = True
    ledger: str | None = None
    resend_for_s: float = 0.0
    token: str | None = None
    tls: client.ClientTls | None = None

    @property
    def per_device(self) -> int:
        """Readings each device sends: rate x duration spread evenly over the fleet."""
        return max(1, round(self.rate * self.duration_s / self.devices))


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of ``values``; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass
class FleetSummary:
    """What a run sent and what came back; counts are in readings, latencies per RPC."""

    planned: int = 0
    sent: int = 0
    accepted: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    resent: int = 0

    @property
    def failed(self) -> int:
        """Readings not accepted, whatever the reason."""
        return sum(self.failed_by_code.values())

    @property
    def ok(self) -> bool:
        """True when every planned reading was sent and accepted."""
        return self.planned > 0 and self.sent == self.planned == self.accepted

    def record_failure(self, code: str, count: int, detail: str) -> None:
        """Count ``count`` readings failed with status ``code``; keep the first detail."""
        self.failed_by_code[code] = self.failed_by_code.get(code, 0) + count
        self.first_error.setdefault(code, detail)

    def render(self) -> str:
        """The human-readable end-of-run report."""
        rate = self.accepted / self.elapsed_s if self.elapsed_s > 0 else 0.0
        p50, p95, p99 = (percentile(self.latencies_s, q) * 1000 for q in (50, 95, 99))
        return "\n".join(
            [
                f"readings: {self.sent} sent of {self.planned} planned, "
                f"{self.accepted} accepted, {self.failed} rejected",
                *(
                    f"  {code}: {n} (first: {self.first_error.get(code) or '-'})"
                    for code, n in sorted(self.failed_by_code.items())
                ),
                f"elapsed: {self.elapsed_s:.2f} s, {rate:.1f} accepted readings/s"
                + (f", {self.resent} resent after refusals" if self.resent else ""),
                f"RPC latency over {len(self.latencies_s)} RPCs: "
                f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms",
            ]
        )


def _open_ledger(path: str | None) -> TextIO | None:
    """The ledger file, appended to and line-buffered; closed by run_fleet."""
    return open(path, "a", buffering=1) if path else None  # noqa: SIM115


def _ledger_line(reading: reading_pb2.Reading) -> str:
    """One acknowledged reading as a JSON line: what ``make reconcile`` checks billing for."""
    timestamp = reading.timestamp.ToDatetime(tzinfo=UTC)
    return (
        json.dumps(
            {
                "reading_id": reading.reading_id or derive_reading_id(reading.device_id, timestamp),
                "device_id": reading.device_id,
                "timestamp": timestamp.isoformat(),
                "usage_kwh": reading.usage_kwh,
            }
        )
        + "\n"
    )


def due_at(start: float, released: int, count: int, rate: float) -> float:
    """When ``count`` more readings may go: tokens accrue at ``rate``/s from ``start`` and
    ``released`` of them are spent already."""
    return start + (released + count) / rate


def first_timestamp(now: float, per_device: int, interval_s: int) -> float:
    """First timestamp (epoch s): ``per_device`` intervals before ``now``.

    Anchored at the run's own start instant rather than the wall-clock grid, so every run
    sends new readings; a rerun on the grid would resend the last run's, which billing
    rightly ignores as duplicates.
    """
    return now - per_device * interval_s


def device_readings(
    device_id: str, start: float, count: int, interval_s: int, base_kw: float, rng: random.Random
) -> Iterator[reading_pb2.Reading]:
    """``count`` readings of one device, one interval apart from ``start``, noisy base load."""
    energy = base_kw * interval_s / 3600
    for j in range(count):
        yield reading_pb2.Reading(
            device_id=device_id,
            timestamp=_timestamp(start + j * interval_s),
            usage_kwh=round(max(0.0, rng.gauss(energy, energy * 0.3)), 4),
        )


def fleet_batches(
    config: FleetConfig, now: float, rng: random.Random
) -> Iterator[list[reading_pb2.Reading]]:
    """Readings in sending order: batch b of every device, then b + 1 (unary: batches of 1)."""
    per, step, size = config.per_device, config.interval_s, config.batch or 1
    start = first_timestamp(now, per, step)
    ids = (f"{config.device_prefix}-{i:05d}" for i in range(1, config.devices + 1))
    streams = [device_readings(d, start, per, step, rng.uniform(0.2, 5.0), rng) for d in ids]
    for _ in range(math.ceil(per / size)):
        for stream in streams:
            yield list(islice(stream, size))


def _timestamp(epoch_s: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(round(epoch_s * 1_000_000))
    return stamp


async def run_fleet(config: FleetConfig) -> FleetSummary:
    """Send every reading of the fleet at ``config.rate``; stop issuing after duration+timeout."""
    summary = FleetSummary(planned=config.per_device * config.devices)
    semaphore, tasks = asyncio.Semaphore(config.concurrency), set[asyncio.Task[None]]()
    console = Console()
    progress = Progress(
        TextColumn("loggers"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not (config.show_progress and console.is_terminal),
    )
    bar = progress.add_task("send", total=summary.planned, status="")
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def send(stub: gateway_pb2_grpc.GatewayStub, chunk: list[reading_pb2.Reading]) -> None:
        began = time.perf_counter()
        try:
            await _send_until_acknowledged(stub, chunk)
        except grpc.aio.AioRpcError as exc:
            summary.record_failure(exc.code().name, len(chunk), exc.details() or "")
        finally:
            semaphore.release()
        summary.latencies_s.append(time.perf_counter() - began)
        per_s = summary.accepted / max(loop.time() - start, 1e-9)
        status = f"ok {summary.accepted}  errors {summary.failed}  {per_s:.0f} readings/s"
        progress.update(bar, advance=len(chunk), status=status)

    async def _send_until_acknowledged(
        stub: gateway_pb2_grpc.GatewayStub, chunk: list[reading_pb2.Reading]
    ) -> None:
        """Like a logger with a buffer: resend what was refused for ``resend_for_s``, after
        the server's retry hint or an exponential backoff."""
        requests = [gateway_pb2.SendReadingRequest(reading=r) for r in chunk]
        backoff_s, give_up = 0.2, loop.time() + config.resend_for_s
        while True:
            try:
                if config.batch:
                    reply = await stub.SendReadings(iter(requests), timeout=config.timeout_s)
                    refused = {r.index for r in reply.rejected}
                    if len(refused) < reply.rejected_count:
                        refused = set(range(len(chunk)))  # not all listed: ledger none
                    accepted = [r for i, r in enumerate(chunk) if i not in refused]
                    if rejected := len(chunk) - reply.accepted:
                        reason = reply.rejected[0].reason if reply.rejected else ""
                        summary.record_failure("INVALID_ARGUMENT", rejected, reason)
                else:
                    await stub.SendReading(requests[0], timeout=config.timeout_s)
                    accepted = chunk
                summary.accepted += len(accepted)
                if ledger is not None:
                    ledger.write("".join(_ledger_line(r) for r in accepted))
                return
            except grpc.aio.AioRpcError as exc:
                delay_s = client.resend_delay_s(exc, backoff_s)
                if not client.should_resend(exc) or loop.time() + delay_s > give_up:
                    raise
                summary.resent += len(chunk)
                await asyncio.sleep(delay_s)
                backoff_s = min(backoff_s * 2, 2.0)

    ledger = _open_ledger(config.ledger)
    try:
        await _send_fleet(config, summary, progress, semaphore, tasks, send)
    finally:
        if ledger is not None:
            ledger.close()
    summary.elapsed_s = loop.time() - start
    return summary


Send = Callable[[gateway_pb2_grpc.GatewayStub, list[reading_pb2.Reading]], Awaitable[None]]


async def _send_fleet(
    config: FleetConfig,
    summary: FleetSummary,
    progress: Progress,
    semaphore: asyncio.Semaphore,
    tasks: set[asyncio.Task[None]],
    send: Send,
) -> None:
    """Pace the fleet's chunks at ``config.rate`` and wait for every send to finish."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    with progress:
        async with client.open_channel(config.target, config.token, config.tls) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for chunk in fleet_batches(config, time.time(), random.Random(config.seed)):
                delay = due_at(start, summary.sent, len(chunk), config.rate) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await semaphore.acquire()
                if loop.time() > start + config.duration_s + config.timeout_s:
                    semaphore.release()
                    break
                summary.sent += len(chunk)
                task = asyncio.create_task(send(stub, chunk))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    devices: Annotated[int, typer.Option(min=1, help="Virtual loggers.")] = 50,
    rate: Annotated[float, typer.Option(min=0.001, help="Total readings per second.")] = 200.0,
    duration_s: Annotated[float, typer.Option("--duration", min=0.001, help="Seconds.")] = 30.0,
    target: client.Target = client.DEFAULT_TARGET,
    batch: Annotated[
        int, typer.Option(min=0, help="0: unary SendReading; N: N readings per SendReadings.")
    ] = 0,
    interval_s: Annotated[int, typer.Option(min=1, help="Seconds each reading covers.")] = 60,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible usage.")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Max RPCs in flight.")] = 64,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="Deadline per RPC, s.")] = 10.0,
    device_prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-00001...")] = "sim",
    ledger: Annotated[
        str | None, typer.Option(help="Append every acknowledged reading to this JSONL file.")
    ] = None,
    resend_for_s: Annotated[
        float, typer.Option(help="Resend refused readings (UNAVAILABLE...) for this long, s.")
    ] = 0.0,
    token: client.Token = None,
    tls_ca: client.TlsCa = None,
    tls_cert: client.TlsCert = None,
    tls_key: client.TlsKey = None,
) -> None:
    """Run the fleet, print the summary; exit 1 unless every reading was accepted."""
    fields = locals()  # the other parameters are FleetConfig's fields
    tls = client.client_tls(fields.pop("tls_ca"), fields.pop("tls_cert"), fields.pop("tls_key"))
    summary = asyncio.run(run_fleet(FleetConfig(**fields, tls=tls)))
    typer.echo(summary.render())
    raise typer.Exit(0 if summary.ok else 1)


if __name__ == "__main__":
    app()
