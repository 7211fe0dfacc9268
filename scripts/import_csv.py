"""Import meter readings from a CSV file into the gateway, in concurrent SendReadings batches.

    python -m scripts.import_csv readings.csv --target 127.0.0.1:50051
    python -m scripts.import_csv meterusage.csv --device meter-17 --time-zone Europe/Oslo

Headers understood: device_id,timestamp,usage_kwh and time,meterusage (needs --device).
Timestamps: ISO-8601 (2024-05-01T12:00:00Z) or YYYY-MM-DD HH:MM:SS; without an offset they
are read in --time-zone. The file is streamed, so memory stays constant whatever its size.
Readings go without a reading_id: the gateway derives it from device + timestamp, so a
re-import bills nothing twice. Duplicate rows are counted among the last 200,000 distinct
(device, timestamp) keys only (bounded memory) and are still sent. Bad rows are reported by
line number (header = line 1) and do not stop the import. Exit 0 when every batch got
through (rejected rows included), 1 when a batch failed after retries, 2 on usage errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import grpc
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.models import ID_PATTERN, ID_RULE
from common.retry import RetryPolicy
from scripts import client_options as client

DEVICE_HEADER = ("device_id", "timestamp", "usage_kwh")
METER_HEADER = ("time", "meterusage")
DUPLICATE_WINDOW = 200_000
MAX_REPORTED_PROBLEMS = 50


class InputError(ValueError):
    """The file cannot be imported at all (header, --device, --time-zone): a usage error."""


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """A row that parsed locally; the gateway still validates it."""

    line: int
    device_id: str
    timestamp: datetime  # aware, UTC
    usage_kwh: float


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that was not imported: its line in the file (header = 1) and why."""

    line: int
    reason: str


class LocalTimes:
    """Naive local times resolved the way a meter writes them, in a file in time order.

    Where the clocks go back, a local time happens twice: its first row in the file is the
    earlier instant, the second row with the same device and local time the later one
    (fold=1), so both hours are billed. Where they go forward, a local time never happens:
    the row is bad, with a reason that says so, rather than moved onto another hour.
    """

    def __init__(self, zone: tzinfo) -> None:
        self.zone = zone
        self._seen_ambiguous: set[tuple[str, datetime]] = set()

    def resolve(self, naive: datetime, device: str = "") -> datetime:
        earlier, later = naive.replace(tzinfo=self.zone), naive.replace(tzinfo=self.zone, fold=1)
        if earlier.utcoffset() == later.utcoffset():
            return earlier.astimezone(UTC)
        if earlier.astimezone(UTC).astimezone(self.zone).replace(tzinfo=None) != naive:
            raise ValueError(
                f"local time {naive.isoformat(sep=' ')} does not exist in {self.zone} (the "
                "clocks went forward then); check the row, or write it with a UTC offset"
            )
        key = (device, naive)
        if key in self._seen_ambiguous:
            return later.astimezone(UTC)
        self._seen_ambiguous.add(key)
        return earlier.astimezone(UTC)


def parse_timestamp(
    text: str, zone: tzinfo = UTC, local_times: LocalTimes | None = None, device: str = ""
) -> datetime:
    """ISO-8601 or ``YYYY-MM-DD HH:MM:SS`` as an aware UTC datetime; naive means ``zone``
    (resolved by ``local_times``, which remembers the file's ambiguous times)."""
    text = text.strip()
    if not text:
        raise ValueError("timestamp is empty")
    try:
        if "T" not in text and " " not in text:
            raise ValueError("no time of day")
        value = datetime.fromisoformat(text)
        if value.tzinfo is not None:
            return value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            f"timestamp {text[:40]!r} is not ISO-8601 (2024-05-01T12:00:00Z) or YYYY-MM-DD HH:MM:SS"
        ) from None
    try:
        return (local_times or LocalTimes(zone)).resolve(value, device)
    except OverflowError:
        raise ValueError(f"timestamp {text[:40]!r} is out of range in {zone}") from None


def parse_usage(text: str) -> float:
    """The usage column as a float; range checks (negative, NaN) are the gateway's."""
    if "_" not in text:
        with contextlib.suppress(ValueError):
            return float(text)
    raise ValueError(f"usage {text.strip()[:40]!r} is not a number of kWh")


def parse_rows(
    lines: Iterable[str], device: str | None = None, zone: tzinfo = UTC
) -> Iterator[ParsedRow | RowProblem]:
    """Check the header now (InputError), then lazily yield one item per non-blank row."""
    reader = csv.reader(lines)
    header = tuple(name.strip().lower() for name in next(reader, []))
    expected = f"'{','.join(DEVICE_HEADER)}' or '{','.join(METER_HEADER)}' (with --device)"
    if header == DEVICE_HEADER:
        if device is not None:
            raise InputError("--device is only for time,meterusage files; this one has device_id")
    elif header == METER_HEADER:
        if device is None:
            raise InputError("a time,meterusage file needs --device DEVICE_ID")
        if not ID_PATTERN.fullmatch(device):
            raise InputError(f"--device {device!r} is not valid; use {ID_RULE}")
    else:
        found = ",".join(header) if header else "nothing (empty file)"
        raise InputError(f"unknown CSV header: found '{found}', expected {expected}")
    return _rows(reader, device, zone, ",".join(header))


def _rows(
    reader: Iterator[list[str]], device: str | None, zone: tzinfo, header: str
) -> Iterator[ParsedRow | RowProblem]:
    width = 2 if device else 3
    local_times = LocalTimes(zone)
    line = 2  # where the next row starts; reader.line_num counts physical lines read
    while True:
        start = line
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            fields = [f"unreadable CSV: {error}"]
        line = reader.line_num + 1  # type: ignore[attr-defined]
        if not fields:
            continue  # blank line
        if len(fields) != width:
            yield RowProblem(start, f"{len(fields)} columns, expected {width} ({header})")
            continue
        owner, stamp, usage = (device, *fields) if device else fields
        try:
            owner = owner.strip()
            timestamp = parse_timestamp(stamp, zone, local_times, owner)
            yield ParsedRow(start, owner, timestamp, parse_usage(usage))
        except ValueError as error:
            yield RowProblem(start, str(error))


class RecentKeys:
    """Remembers the last ``capacity`` distinct keys (by hash: ~80 bytes each, bounded)."""

    def __init__(self, capacity: int = DUPLICATE_WINDOW) -> None:
        self.capacity = capacity
        self._order: deque[int] = deque()
        self._keys: set[int] = set()

    def repeated(self, key: object) -> bool:
        """True when ``key`` is among the remembered ones; otherwise remember it."""
        digest = hash(key)
        if digest in self._keys:
            return True
        self._keys.add(digest)
        self._order.append(digest)
        if len(self._order) > self.capacity:
            self._keys.discard(self._order.popleft())
        return False


@dataclass(frozen=True)
class ImportConfig:
    """What to import and how; the CLI options map onto these fields."""

    path: Path
    device: str | None = None
    target: str = client.DEFAULT_TARGET
    batch: int = 1000
    streams: int = 4
    timeout_s: float = 60.0
    time_zone: str = "UTC"
    retries: int = 5
    retry_initial_s: float = 0.5
    retry_max_s: float = 10.0
    show_progress: bool = True
    token: str | None = None
    tls: client.ClientTls | None = None


@dataclass
class ImportSummary:
    """Counts of one import; ``problems`` keeps the lowest-numbered lines only."""

    rows_read: int = 0
    accepted: int = 0
    rejected_local: int = 0
    rejected_gateway: int = 0
    duplicates: int = 0
    retries: int = 0
    elapsed_s: float = 0.0
    failure: str = ""
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return self.rejected_local + self.rejected_gateway

    @property
    def ok(self) -> bool:
        """True unless a batch failed as a whole (rejected rows do not count)."""
        return not self.failure

    def add_problem(self, problem: RowProblem) -> None:
        """Keep the MAX_REPORTED_PROBLEMS lowest lines seen so far (bounded memory)."""
        self.problems.append(problem)
        if len(self.problems) > 2 * MAX_REPORTED_PROBLEMS:
            self.problems = sorted(self.problems, key=lambda p: p.line)[:MAX_REPORTED_PROBLEMS]

    def report_problems(self) -> str:
        """The first problems by line, then how many more there were (for stderr)."""
        shown = sorted(self.problems, key=lambda p: p.line)[:MAX_REPORTED_PROBLEMS]
        text = [f"line {p.line}: {p.reason}" for p in shown]
        if (more := self.rejected - len(shown)) > 0:
            text.append(f"... and {more} more rejected rows ({self.rejected} in total)")
        return "\n".join(text)

    def render(self) -> str:
        """The final summary (for stdout)."""
        rate = self.rows_read / self.elapsed_s if self.elapsed_s > 0 else 0.0
        text = [
            f"rows read: {self.rows_read}, accepted: {self.accepted}, rejected: {self.rejected} "
            f"({self.rejected_local} in the file, {self.rejected_gateway} by the gateway), "
            f"duplicates in file: {self.duplicates}",
            f"elapsed: {self.elapsed_s:.2f} s, {rate:.0f} rows/s, retries: {self.retries}",
        ]
        if self.failure:
            text.append(
                f"FAILED: {self.failure}. {self.accepted} rows were accepted before the "
                "failure; rerun the import: accepted rows are deduplicated by reading id."
            )
        return "\n".join(text)


# A batch's lines, and its readings packed into stream messages (``readings``) of at most
# READINGS_PER_MESSAGE: gRPC's cost is per message, and 1,000 short rows stay far below the
# gateway's 1 MiB message limit.
Batch = tuple[list[int], list[gateway_pb2.SendReadingRequest]]
READINGS_PER_MESSAGE = 1000


def _batches(
    items: Iterator[ParsedRow | RowProblem], size: int, summary: ImportSummary
) -> Iterator[Batch]:
    """Group good rows into batches of ``size``; count reads, duplicates and local problems."""
    recent = RecentKeys()
    lines: list[int] = []
    readings: list[reading_pb2.Reading] = []
    for item in items:
        summary.rows_read += 1
        if isinstance(item, RowProblem):
            summary.rejected_local += 1
            summary.add_problem(item)
            continue
        summary.duplicates += recent.repeated((item.device_id, item.timestamp))
        reading = reading_pb2.Reading(device_id=item.device_id, usage_kwh=item.usage_kwh)
        reading.timestamp.FromDatetime(item.timestamp)
        lines.append(item.line)
        readings.append(reading)
        if len(readings) == size:
            yield lines, _packed(readings)
            lines, readings = [], []
    if readings:
        yield lines, _packed(readings)


def _packed(readings: list[reading_pb2.Reading]) -> list[gateway_pb2.SendReadingRequest]:
    return [
        gateway_pb2.SendReadingRequest(readings=readings[start : start + READINGS_PER_MESSAGE])
        for start in range(0, len(readings), READINGS_PER_MESSAGE)
    ]


async def _send(
    stub: gateway_pb2_grpc.GatewayStub, batch: Batch, config: ImportConfig, summary: ImportSummary
) -> None:
    """One SendReadings call, resent up to ``config.retries`` times on the codes a logger
    resends; record the outcome.

    The wait before a resend is the server's retry hint when it gave one, else the backoff
    of a RetryPolicy (common.retry's ``retrying`` cannot take a hint, hence this loop).
    """
    lines, requests = batch
    backoff = RetryPolicy(config.retry_initial_s, config.retry_max_s, config.retries + 1)
    attempt = 0
    while True:
        attempt += 1
        try:
            reply = await stub.SendReadings(iter(requests), timeout=config.timeout_s)
            break
        except grpc.aio.AioRpcError as error:
            if not client.should_resend(error) or attempt > config.retries:
                if not summary.failure:
                    summary.failure = (
                        f"the batch of lines {lines[0]}-{lines[-1]} failed: "
                        f"{error.code().name}: {error.details()}"
                    )
                return
            summary.retries += 1
            await asyncio.sleep(client.resend_delay_s(error, backoff.delay_s(attempt)))
    summary.accepted += reply.accepted
    summary.rejected_gateway += reply.rejected_count
    for rejected in reply.rejected:
        summary.add_problem(RowProblem(lines[rejected.index], f"gateway: {rejected.reason}"))
    if (unlisted := reply.rejected_count - len(reply.rejected)) > 0:
        reason = f"gateway: {unlisted} more rows up to line {lines[-1]} rejected, not listed"
        after = reply.rejected[-1].index + 1 if reply.rejected else 0
        summary.add_problem(RowProblem(lines[min(after, len(lines) - 1)], reason))


async def import_csv(config: ImportConfig) -> ImportSummary:
    """Stream ``config.path`` to the gateway, at most ``config.streams`` batches in flight.

    Raises InputError (before sending anything) when the file cannot be imported at all.
    """
    try:
        zone = ZoneInfo(config.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"unknown time zone {config.time_zone!r}; try UTC, Europe/Oslo") from None
    summary = ImportSummary()
    started = time.perf_counter()
    console = Console()
    progress = Progress(
        TextColumn("import"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]} rows  {task.fields[rate]} rows/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not (config.show_progress and console.is_terminal),
    )
    size = config.path.stat().st_size
    bar = progress.add_task("import", total=size, rows=0, rate=0)
    slots = asyncio.Semaphore(config.streams)
    tasks: set[asyncio.Task[None]] = set()

    def done(_task: asyncio.Task[None]) -> None:
        slots.release()
        rows = summary.accepted + summary.rejected
        rate = round(rows / max(time.perf_counter() - started, 1e-9))
        progress.update(bar, completed=file.buffer.tell(), rows=rows, rate=rate)

    # Buffered reads in the event loop, deliberately: they are short and keep memory flat.
    # Undecodable bytes become U+FFFD, so such a row is reported rather than fatal.
    with config.path.open(newline="", encoding="utf-8-sig", errors="replace") as file:
        batches = _batches(parse_rows(file, config.device, zone), config.batch, summary)
        with progress:
            async with client.open_channel(config.target, config.token, config.tls) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                while True:
                    await slots.acquire()
                    batch = None if summary.failure else next(batches, None)
                    if batch is None:
                        slots.release()
                        break
                    task = asyncio.create_task(_send(stub, batch, config, summary))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(done)
                await asyncio.gather(*tasks)
            progress.update(bar, completed=size)
    summary.elapsed_s = time.perf_counter() - started
    return summary


app = typer.Typer(add_completion=False, rich_markup_mode=None)


@app.command(help=__doc__)
def main(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="PATH")],
    device: Annotated[str | None, typer.Option(help="Device id of a time,meterusage file.")] = None,
    target: client.Target = client.DEFAULT_TARGET,
    batch: Annotated[int, typer.Option(min=1, help="Rows per SendReadings call.")] = 1000,
    streams: Annotated[int, typer.Option(min=1, help="SendReadings calls in flight.")] = 4,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="Deadline per call, s.")] = 60.0,
    time_zone: Annotated[str, typer.Option(help="Zone of timestamps without offset.")] = "UTC",
    token: client.Token = None,
    tls_ca: client.TlsCa = None,
    tls_cert: client.TlsCert = None,
    tls_key: client.TlsKey = None,
) -> None:
    """Import the file, print problems (stderr) and the summary; exit 0, 1 or 2."""
    tls = client.client_tls(tls_ca, tls_cert, tls_key)
    config = ImportConfig(
        path, device, target, batch, streams, timeout_s, time_zone, token=token, tls=tls
    )
    try:
        summary = asyncio.run(import_csv(config))
    except InputError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if summary.rejected:
        typer.echo(summary.report_problems(), err=True)
    typer.echo(summary.render())
    raise typer.Exit(0 if summary.ok else 1)


if __name__ == "__main__":
    app()
