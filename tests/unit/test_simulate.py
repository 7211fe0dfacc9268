"""The logger simulator: readings, pacing, summary, and runs against a fake in-process gateway."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import pytest
from typer.testing import CliRunner

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc
from common.models import InvalidReading, validate_reading
from scripts import simulate
from scripts.simulate import (
    FleetConfig,
    FleetSummary,
    due_at,
    first_timestamp,
    fleet_batches,
    percentile,
    run_fleet,
)

NOW = 1_790_000_123.4  # epoch seconds, off the grid on purpose
NOW_DT = datetime.fromtimestamp(NOW, UTC)


def readings_by_device(config: FleetConfig) -> dict[str, list]:
    by_device: dict[str, list] = {}
    for chunk in fleet_batches(config, NOW, random.Random(7)):
        assert len({r.device_id for r in chunk}) == 1, "a batch holds one device's readings"
        by_device.setdefault(chunk[0].device_id, []).extend(chunk)
    return by_device


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_readings_are_past_unique_evenly_spaced_and_plausible(batch: int) -> None:
    config = FleetConfig(devices=4, rate=10, duration_s=9.5, batch=batch, interval_s=900)
    by_device = readings_by_device(config)
    assert sorted(by_device) == ["sim-00001", "sim-00002", "sim-00003", "sim-00004"]
    for readings in by_device.values():
        stamps = [r.timestamp.ToMicroseconds() / 1e6 for r in readings]
        assert len(stamps) == config.per_device == 24  # round(10 * 9.5 / 4)
        assert stamps == sorted(set(stamps)), "unique and ascending per device"
        assert all(b - a == 900 for a, b in zip(stamps, stamps[1:], strict=False))
        assert stamps[0] == first_timestamp(NOW, 24, 900) and stamps[-1] == NOW - 900
        for r in readings:
            assert r.usage_kwh >= 0 and round(r.usage_kwh, 4) == r.usage_kwh
            assert r.usage_kwh < 5.0 * 900 / 3600 * 3  # base load at most 5 kW, modest noise
            assert r.reading_id == ""
            validate_reading(r.device_id, r.timestamp.ToDatetime(UTC), r.usage_kwh, now=NOW_DT)


def test_batches_go_round_robin_and_the_last_one_is_short() -> None:
    config = FleetConfig(devices=2, rate=10, duration_s=1, batch=3, device_prefix="m")
    chunks = list(fleet_batches(config, NOW, random.Random(1)))
    assert [(c[0].device_id, len(c)) for c in chunks] == [
        ("m-00001", 3),
        ("m-00002", 3),
        ("m-00001", 2),
        ("m-00002", 2),
    ]


def test_same_seed_same_readings() -> None:
    config = FleetConfig(devices=3, rate=5, duration_s=6)
    first = [r for c in fleet_batches(config, NOW, random.Random(3)) for r in c]
    again = [r for c in fleet_batches(config, NOW, random.Random(3)) for r in c]
    other = [r for c in fleet_batches(config, NOW, random.Random(4)) for r in c]
    assert first == again != other


def test_pacing_releases_tokens_at_the_rate() -> None:
    assert due_at(10.0, released=0, count=1, rate=200) == pytest.approx(10.005)
    assert due_at(0.0, released=100, count=10, rate=100) == pytest.approx(1.1)
    # the last of rate x duration readings is due exactly duration after the start
    assert due_at(5.0, released=5999, count=1, rate=200) == pytest.approx(35.0)


def test_percentile_is_nearest_rank() -> None:
    values = [i / 1000 for i in range(100, 0, -1)]  # 1..100 ms, unsorted
    assert [percentile(values, q) for q in (50, 95, 99, 100)] == [0.05, 0.095, 0.099, 0.1]
    assert percentile([0.2], 99) == 0.2
    assert percentile([], 50) == 0.0


def test_summary_renders_counts_codes_rate_and_latency() -> None:
    summary = FleetSummary(planned=100, sent=100, accepted=88, elapsed_s=2.0)
    summary.record_failure("UNAVAILABLE", 10, "broker down")
    summary.record_failure("UNAVAILABLE", 2, "ignored, not the first")
    summary.latencies_s = [0.001] * 90 + [0.050] * 10
    text = summary.render()
    assert summary.failed == 12 and not summary.ok
    assert "100 sent of 100 planned, 88 accepted, 12 rejected" in text
    assert "UNAVAILABLE: 12 (first: broker down)" in text
    assert "44.0 accepted readings/s" in text
    assert "p50 1.0 ms, p95 50.0 ms, p99 50.0 ms" in text
    assert FleetSummary(planned=3, sent=3, accepted=3).ok
    assert not FleetSummary().ok


@dataclass
class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Validates like the real gateway; fails every ``fail_every``-th RPC with UNAVAILABLE and,
    in streams, rejects readings of devices named in ``reject_devices``."""

    fail_every: int = 4
    reject_devices: frozenset[str] = frozenset()
    hang_s: float = 0.0
    rpcs: int = 0
    received: int = 0
    accepted: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    seen: set[tuple[str, int]] = field(default_factory=set)

    def _check(self, request: gateway_pb2.SendReadingRequest) -> None:
        r = request.reading
        now = datetime.now(UTC)
        validate_reading(r.device_id, r.timestamp.ToDatetime(UTC), r.usage_kwh, now=now)
        assert r.reading_id == "" and (r.device_id, r.timestamp.seconds) not in self.seen
        self.seen.add((r.device_id, r.timestamp.seconds))
        if r.device_id in self.reject_devices:
            raise InvalidReading("device_id", "unknown logger")

    async def _maybe_fail(self, context: grpc.aio.ServicerContext, readings: int) -> None:
        self.rpcs += 1
        self.received += readings
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if self.rpcs % self.fail_every == 0:
            self.codes["UNAVAILABLE"] += readings
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker unavailable")

    async def SendReading(self, request, context):
        await self._maybe_fail(context, 1)
        try:
            self._check(request)
        except InvalidReading as exc:
            self.codes["INVALID_ARGUMENT"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self.accepted += 1
        return gateway_pb2.SendReadingResponse(reading_id="x")

    async def SendReadings(self, request_iterator, context):
        requests = [request async for request in request_iterator]
        await self._maybe_fail(context, len(requests))
        reply = gateway_pb2.SendReadingsResponse()
        for index, request in enumerate(requests):
            try:
                self._check(request)
                reply.accepted += 1
            except InvalidReading as exc:
                reply.rejected_count += 1
                reply.rejected.add(
                    index=index, device_id=request.reading.device_id, reason=str(exc)
                )
        self.accepted += reply.accepted
        self.codes["INVALID_ARGUMENT"] += reply.rejected_count
        return reply


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[FakeGateway, str]]:
    fake = FakeGateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield fake, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.mark.parametrize("batch", [0, 7])
async def test_run_fleet_counts_match_what_the_gateway_saw(
    gateway: tuple[FakeGateway, str], batch: int
) -> None:
    fake, target = gateway
    fake.reject_devices = frozenset({"sim-00002"})
    config = FleetConfig(
        devices=5, rate=1000, duration_s=0.2, target=target, batch=batch, seed=1, concurrency=8
    )
    summary = await run_fleet(config)

    assert summary.planned == summary.sent == fake.received == 200
    assert summary.accepted == fake.accepted > 0
    expected_codes = {code: n for code, n in fake.codes.items() if n}
    assert summary.failed_by_code == expected_codes
    assert summary.failed_by_code["UNAVAILABLE"] > 0
    assert "unknown logger" in summary.first_error["INVALID_ARGUMENT"]
    assert summary.accepted + summary.failed == summary.sent
    assert len(summary.latencies_s) == fake.rpcs == (200 if not batch else 5 * 6)
    assert summary.elapsed_s >= 0.19, "paced to 1000 readings/s"
    assert not summary.ok


async def test_slow_gateway_gives_deadline_exceeded(gateway: tuple[FakeGateway, str]) -> None:
    fake, target = gateway
    fake.hang_s = 1.0
    config = FleetConfig(devices=2, rate=100, duration_s=0.04, target=target, timeout_s=0.1)
    summary = await run_fleet(config)
    assert summary.failed_by_code == {"DEADLINE_EXCEEDED": 4} and summary.accepted == 0


def test_cli_maps_options_and_exits_by_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[FleetConfig] = []
    result = FleetSummary(planned=2, sent=2, accepted=2, elapsed_s=1.0)

    async def fake_run(config: FleetConfig) -> FleetSummary:
        seen.append(config)
        return result

    monkeypatch.setattr(simulate, "run_fleet", fake_run)
    args = "--devices 3 --rate 9 --duration 2 --target h:1 --batch 4 --interval-s 300 "
    args += "--seed 5 --concurrency 2 --timeout-s 1.5 --device-prefix lab"
    outcome = CliRunner().invoke(simulate.app, args.split())
    assert outcome.exit_code == 0, outcome.output
    assert "2 sent of 2 planned, 2 accepted, 0 rejected" in outcome.output
    assert seen == [FleetConfig(3, 9.0, 2.0, "h:1", 4, 300, 5, 2, 1.5, "lab")]

    result.accepted = 1
    result.record_failure("UNAVAILABLE", 1, "down")
    assert CliRunner().invoke(simulate.app, []).exit_code == 1
    assert seen[-1] == FleetConfig()
