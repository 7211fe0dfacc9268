"""The CSV importer: parsing with line numbers, and imports into a real in-process gateway."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from typer.testing import CliRunner

from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.models import derive_reading_id
from scripts import import_csv as importer
from scripts.bench.fakes import fake_gateway
from scripts.import_csv import (
    ImportConfig,
    ImportSummary,
    InputError,
    ParsedRow,
    RecentKeys,
    RowProblem,
    import_csv,
    parse_rows,
    parse_timestamp,
)

HEADER = "device_id,timestamp,usage_kwh\n"
T0 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=3)
Record = tuple[str, str, datetime, float]  # reading_id, device_id, timestamp, usage_kwh


def parse(text: str, device: str | None = None, zone: str = "UTC") -> list:
    return list(parse_rows(text.splitlines(keepends=True), device, ZoneInfo(zone)))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# --- parsing -------------------------------------------------------------------------------


def test_device_form_with_and_without_offsets() -> None:
    text = HEADER + (
        "m-1,2024-05-01T12:00:00Z,1.5\n"
        "m-2,2024-05-01T14:00:00+02:00,0\n"
        " m-3 , 2024-05-01 12:00:00 , 2.25 \n"
        "m-4,2024-05-01T12:00:00.250,1e-3\n"
    )
    assert parse(text, zone="Europe/Oslo") == [
        ParsedRow(2, "m-1", utc(2024, 5, 1, 12), 1.5),
        ParsedRow(3, "m-2", utc(2024, 5, 1, 12), 0.0),
        ParsedRow(4, "m-3", utc(2024, 5, 1, 10), 2.25),  # naive: Oslo summer time, UTC+2
        ParsedRow(5, "m-4", utc(2024, 5, 1, 10, 0, 0, 250000), 0.001),
    ]


def test_meter_usage_form_uses_the_device_and_time_zone() -> None:
    text = "time,meterusage\n2019-01-01 00:15:00,55.09\n2019-07-01T00:30:00Z,1\n"
    assert parse(text, device="meter-7", zone="Europe/Oslo") == [
        ParsedRow(2, "meter-7", utc(2018, 12, 31, 23, 15), 55.09),  # winter: UTC+1
        ParsedRow(3, "meter-7", utc(2019, 7, 1, 0, 30), 1.0),
    ]
    assert parse("Time , MeterUsage\n2019-01-01 00:15:00,1\n", device="m")[0].device_id == "m"


def test_bad_rows_are_reported_with_their_line_numbers_and_do_not_stop_the_rest() -> None:
    text = HEADER + (
        "a,2024-05-01T00:00:00Z,1\n"  # 2 ok
        "a,2024-05-01T00:01:00Z\n"  # 3 missing column
        "a,2024-05-01T00:02:00Z,1,9\n"  # 4 extra column
        "a,2024-05-01T00:03:00Z,abc\n"  # 5 bad number
        "a,2024-05-01T00:04:00Z,1_000\n"  # 6 bad number
        "a,yesterday,1\n"  # 7 bad timestamp
        "a,2024-05-01,1\n"  # 8 date without time
        "a,,1\n"  # 9 empty timestamp
        "\n"  # 10 blank: skipped, not a problem
        'a,2024-05-01T00:05:00Z,"1\n2"\n'  # 11-12 a quoted newline: one row from line 11
        "a,2024-05-01T00:06:00Z,-1\n"  # 13 parses; the gateway rejects negatives
    )
    items = parse(text)
    assert [(i.line, type(i).__name__) for i in items] == [
        (2, "ParsedRow"),
        *[(line, "RowProblem") for line in (3, 4, 5, 6, 7, 8, 9, 11)],
        (13, "ParsedRow"),
    ]
    reasons = {i.line: i.reason for i in items if isinstance(i, RowProblem)}
    assert reasons[3] == reasons[4].replace("4 columns", "2 columns")
    assert reasons[4] == "4 columns, expected 3 (device_id,timestamp,usage_kwh)"
    assert reasons[5] == "usage 'abc' is not a number of kWh"
    assert reasons[6] == "usage '1_000' is not a number of kWh"
    assert reasons[7].startswith("timestamp 'yesterday' is not ISO-8601")
    assert reasons[8].startswith("timestamp '2024-05-01' is not ISO-8601")
    assert reasons[9] == "timestamp is empty"
    assert reasons[11] == "usage '1\\n2' is not a number of kWh"


def test_timestamp_formats() -> None:
    assert parse_timestamp("2024-05-01T12:00:00Z") == utc(2024, 5, 1, 12)
    assert parse_timestamp("2024-05-01T12:00:00-05:00") == utc(2024, 5, 1, 17)
    assert parse_timestamp("2024-05-01 12:00:00", ZoneInfo("America/New_York")) == utc(
        2024, 5, 1, 16
    )
    with pytest.raises(ValueError, match="not ISO-8601"):
        parse_timestamp("01/05/2024 12:00")


def oslo_day_file(day: datetime, skip_gap: bool = True) -> tuple[str, float]:
    """A meter's 15-minute file of one Oslo day, as it writes it (wall-clock times, in
    order); returns the text and the day's energy in kWh. Where the clocks go back the
    02:00-02:45 rows appear twice; where they go forward a meter writes none."""
    oslo = ZoneInfo("Europe/Oslo")
    start = day.replace(tzinfo=oslo).astimezone(UTC)
    end = (day + timedelta(days=1)).replace(tzinfo=oslo).astimezone(UTC)
    lines, energy, k, stamp = ["time,meterusage\n"], 0.0, 0, start + timedelta(minutes=15)
    while stamp <= end:
        kwh = round(0.1 + k / 1000, 3)
        local = stamp.astimezone(oslo).replace(tzinfo=None)
        lines.append(f"{local:%Y-%m-%d %H:%M:%S},{kwh}\n")
        energy, k, stamp = energy + kwh, k + 1, stamp + timedelta(minutes=15)
    return "".join(lines), energy


def test_the_night_clocks_go_back_bills_both_hours() -> None:
    text, energy = oslo_day_file(datetime(2026, 10, 25))
    rows = parse(text, device="meter-7", zone="Europe/Oslo")
    assert len(rows) == 100 and all(isinstance(r, ParsedRow) for r in rows)
    stamps = [r.timestamp for r in rows]
    assert stamps == sorted(stamps) and len(set(stamps)) == 100  # the second 02:15 is later
    assert stamps[8:9] == [utc(2026, 10, 25, 0, 15)]  # first 02:15, summer time (UTC+2)
    assert stamps[12:13] == [utc(2026, 10, 25, 1, 15)]  # second 02:15, winter time (UTC+1)
    assert sum(r.usage_kwh for r in rows) == pytest.approx(energy)


def test_the_night_clocks_go_forward_a_time_that_never_happened_is_a_bad_row() -> None:
    text, energy = oslo_day_file(datetime(2026, 3, 29))
    rows = parse(text, device="meter-7", zone="Europe/Oslo")
    assert len(rows) == 92 and len({r.timestamp for r in rows}) == 92
    assert sum(r.usage_kwh for r in rows) == pytest.approx(energy)
    bad = parse("time,meterusage\n2026-03-29 02:15:00,1.0\n", "meter-7", "Europe/Oslo")
    assert bad == [
        RowProblem(
            2,
            "local time 2026-03-29 02:15:00 does not exist in Europe/Oslo (the clocks went "
            "forward then); check the row, or write it with a UTC offset",
        )
    ]


def test_ambiguous_times_are_resolved_per_device() -> None:
    text = HEADER + "a,2026-10-25 02:15:00,1\nb,2026-10-25 02:15:00,2\na,2026-10-25 02:15:00,3\n"
    assert [r.timestamp for r in parse(text, zone="Europe/Oslo")] == [
        utc(2026, 10, 25, 0, 15),
        utc(2026, 10, 25, 0, 15),
        utc(2026, 10, 25, 1, 15),
    ]


@pytest.mark.parametrize(
    ("text", "device", "message"),
    [
        ("id,when,kwh\n", None, "found 'id,when,kwh', expected 'device_id,timestamp,usage_kwh'"),
        ("", None, "found 'nothing (empty file)'"),
        ("time,meterusage\n", None, "needs --device"),
        ("time,meterusage\n", "bad id", "--device 'bad id' is not valid"),
        (HEADER, "m-1", "--device is only for time,meterusage files"),
    ],
)
def test_header_errors_are_raised_before_any_row(text: str, device: str | None, message: str):
    with pytest.raises(InputError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_rows(text.splitlines(keepends=True), device)


def test_recent_keys_remember_a_bounded_window() -> None:
    keys = RecentKeys(capacity=3)
    assert [keys.repeated(k) for k in "abcab"] == [False, False, False, True, True]
    assert keys.repeated("d") is False  # evicts "a"
    assert [keys.repeated(k) for k in "ad"] == [False, True]


def test_problem_report_lists_the_first_50_by_line_then_a_count() -> None:
    summary = ImportSummary(rejected_local=70)
    for line in range(71, 1, -1):
        summary.add_problem(RowProblem(line, "bad"))
    report = summary.report_problems().splitlines()
    assert report[0] == "line 2: bad" and report[49] == "line 51: bad"
    assert report[50:] == ["... and 20 more rejected rows (70 in total)"]


# --- imports into a real gateway -----------------------------------------------------------


@dataclass
class RecordingIngestion(ingestion_pb2_grpc.IngestionServicer):
    """Records every published reading; calls numbered from ``fail_from`` fail with ``code``."""

    fail_from: int = 10**9
    fail_until: int = 10**9
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    calls: int = 0
    records: list[Record] = field(default_factory=list)

    async def Publish(self, request, context):
        self.calls += 1
        if self.fail_from <= self.calls < self.fail_until:
            await context.abort(self.code, "RabbitMQ is down")
        self.records += [
            (r.reading_id, r.device_id, r.timestamp.ToDatetime(UTC), r.usage_kwh)
            for r in request.readings
        ]
        return ingestion_pb2.PublishResponse(published=len(request.readings))


@pytest.fixture
async def stack() -> AsyncIterator[tuple[RecordingIngestion, str]]:
    fake = RecordingIngestion()
    async with fake_gateway(fake) as target:
        yield fake, target


def config(path: Path, target: str, **kw: object) -> ImportConfig:
    options: dict = {"show_progress": False, "retry_initial_s": 0.01, "retry_max_s": 0.02}
    return ImportConfig(path=path, target=target, **(options | kw))


def expected(device: str, stamp: datetime, kwh: float) -> Record:
    return derive_reading_id(device, stamp), device, stamp, kwh


def write_big_csv(path: Path, rows: int = 3000) -> list[Record]:
    """``rows`` rows over 10 devices with bad ones mixed in; returns what must be accepted."""
    good: list[Record] = []
    lines = [HEADER]
    for k in range(rows):
        line, device, stamp, kwh = k + 2, f"dev-{k % 10}", T0 + timedelta(minutes=k // 10), k / 1000
        text = f"{device},{stamp.isoformat()},{kwh}\n"
        match line:
            case 10:
                text = f"{device},{stamp.isoformat()},abc\n"
            case 500:
                text = f"{device},{stamp.isoformat()}\n"
            case 777:
                text = f"{device},tomorrow,{kwh}\n"
            case 1234 | 2999:
                text = f"{device},{stamp.isoformat()},-1.5\n"
            case 2001:
                text = f"bad meter,{stamp.isoformat()},{kwh}\n"
            case 1500:
                text = lines[100]  # line 100 again: a duplicate, still sent and accepted
                good.append(good[100 - 2])
            case _:
                good.append(expected(device, stamp, kwh))
        lines.append(text)
    path.write_text("".join(lines))
    return good


async def test_import_reports_exact_lines_and_ingestion_gets_exactly_the_accepted(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    good = write_big_csv(tmp_path / "big.csv")
    summary = await import_csv(config(tmp_path / "big.csv", target, batch=250, streams=3))

    assert summary.ok and summary.failure == "" and summary.retries == 0
    assert (summary.rows_read, summary.accepted, summary.duplicates) == (3000, 2994, 1)
    assert (summary.rejected_local, summary.rejected_gateway) == (3, 3)
    problems = sorted(summary.problems, key=lambda p: p.line)
    assert [p.line for p in problems] == [10, 500, 777, 1234, 2001, 2999]
    assert problems[0].reason == "usage 'abc' is not a number of kWh"
    assert problems[1].reason == "2 columns, expected 3 (device_id,timestamp,usage_kwh)"
    assert problems[2].reason.startswith("timestamp 'tomorrow' is not ISO-8601")
    negative = "gateway: usage_kwh: is -1.5; energy used in an interval cannot be negative"
    assert problems[3].reason == problems[5].reason == negative
    assert problems[4].reason.startswith("gateway: device_id: 'bad meter' is not valid")
    assert Counter(fake.records) == Counter(good) and len(fake.records) == 2994


async def test_meter_usage_form_with_device(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    path = tmp_path / "meterusage.csv"
    path.write_text("time,meterusage\n2019-01-01 00:15:00,55.09\n2019-01-01 00:30:00,NaN\n")
    summary = await import_csv(config(path, target, device="meter-7", time_zone="Europe/Oslo"))
    assert (summary.rows_read, summary.accepted, summary.rejected_gateway) == (2, 1, 1)
    assert [p.line for p in summary.problems] == [3]
    assert fake.records == [expected("meter-7", utc(2018, 12, 31, 23, 15), 55.09)]


async def test_both_dst_nights_import_every_row_once(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    for day, rows in ((datetime(2026, 10, 25), 100), (datetime(2026, 3, 29), 92)):
        text, energy = oslo_day_file(day)
        path = tmp_path / f"{day:%m}.csv"
        path.write_text(text)
        before = len(fake.records)
        summary = await import_csv(config(path, target, device="m-9", time_zone="Europe/Oslo"))
        assert (summary.rows_read, summary.accepted, summary.duplicates) == (rows, rows, 0)
        sent = fake.records[before:]
        assert len({rid for rid, *_ in sent}) == rows  # no two rows share a reading id
        assert sum(kwh for *_, kwh in sent) == pytest.approx(energy)


async def test_importing_twice_sends_the_same_derived_ids(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    good = write_big_csv(tmp_path / "big.csv", rows=400)
    for _ in range(2):
        assert (await import_csv(config(tmp_path / "big.csv", target, batch=64))).ok
    first, second = fake.records[: len(fake.records) // 2], fake.records[len(fake.records) // 2 :]
    assert len(first) == 399 and Counter(first) == Counter(second) == Counter(good)
    assert all(rid == derive_reading_id(dev, stamp) for rid, dev, stamp, _ in first)


async def test_transient_failures_are_retried(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    fake.fail_from, fake.fail_until = 1, 3  # the first two Publish calls fail
    good = write_big_csv(tmp_path / "small.csv", rows=8)
    summary = await import_csv(config(tmp_path / "small.csv", target))
    assert summary.ok and summary.retries == 2 and summary.accepted == len(good) == 8
    assert Counter(fake.records) == Counter(good)


async def test_a_batch_failing_after_all_retries_stops_the_import(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    fake.fail_from = 2  # the first batch goes through, then the broker stays down
    write_big_csv(tmp_path / "small.csv", rows=30)
    summary = await import_csv(config(tmp_path / "small.csv", target, batch=10, streams=1))
    assert not summary.ok and summary.accepted == 10 and summary.retries == 5
    assert fake.calls == 1 + 6, "one good call, then 1 + 5 retries of the second batch"
    assert summary.failure.startswith("the batch of lines 13-22 failed: UNAVAILABLE")
    assert "10 rows were accepted before the failure" in summary.render()


async def test_cli_reports_50_problems_then_a_count_and_exits_by_outcome(
    stack: tuple[RecordingIngestion, str], tmp_path: Path
) -> None:
    fake, target = stack
    path = tmp_path / "bad.csv"
    rows = [
        f"d,{(T0 + timedelta(minutes=k)).isoformat()},{'x' if k < 60 else 1}" for k in range(70)
    ]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    args = [str(path), "--target", target, "--batch", "4", "--streams", "2"]
    result = await asyncio.to_thread(CliRunner().invoke, importer.app, args)
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[:2] == [
        "line 2: usage 'x' is not a number of kWh",
        "line 3: usage 'x' is not a number of kWh",
    ]
    assert "line 51:" in result.stderr and "line 52:" not in result.stderr
    assert "... and 10 more rejected rows (60 in total)" in result.stderr
    assert "rows read: 70, accepted: 10, rejected: 60 (60 in the file, 0 by" in result.stdout

    fake.fail_from, fake.code = 1, grpc.StatusCode.INTERNAL  # not retried
    args[-1] = "1"  # --streams 1: the first batch is the one that fails
    result = await asyncio.to_thread(CliRunner().invoke, importer.app, args)
    assert result.exit_code == 1
    assert "FAILED: the batch of lines 62-65 failed: INTERNAL" in result.stdout
    assert "0 rows were accepted before the failure" in result.stdout


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("a,b,c\n", [], "expected 'device_id,timestamp,usage_kwh' or 'time,meterusage'"),
        ("time,meterusage\n", [], "needs --device"),
        (HEADER, ["--time-zone", "Mars/Base"], "unknown time zone 'Mars/Base'"),
    ],
)
def test_cli_usage_errors_exit_2(
    tmp_path: Path, content: str, extra: list[str], message: str
) -> None:
    path = tmp_path / "in.csv"
    path.write_text(content)
    result = CliRunner().invoke(importer.app, [str(path), "--target", "127.0.0.1:1", *extra])
    assert result.exit_code == 2 and message in result.stderr
    assert CliRunner().invoke(importer.app, [str(tmp_path / "missing.csv")]).exit_code == 2
