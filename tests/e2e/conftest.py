"""The four services as real processes (python -m ...), isolated by names and ports."""

from __future__ import annotations

import asyncio
import csv
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from billing_service.adapters.mongo import MongoLedger
from billing_service.adapters.redis import RedisCache
from common.models import Reading
from scripts.bench.stack import SERVICES
from scripts.bench.stack import Stack as ProcessStack
from scripts.import_csv import ImportConfig, ImportSummary, import_csv
from tests.conftest import ADMIN_TOKEN, MONGODB_URL, RABBITMQ_URL, REDIS_URL
from tests.tcp_proxy import TcpProxy

__all__ = ["SERVICES", "Stack"]

# How long a test's client resends what the gateway refused under backpressure (on the slower
# machines RabbitMQ confirms ~2,000 persistent messages/s and forwards meet their deadline).
RESEND_FOR_S = 300


# Short timers, so that the tests see shutdowns and refreshes within seconds.
# Billing never closes periods on its own (BILLING_CLOSE_CHECK_INTERVAL_S=0): tests send
# readings for past months and read their estimates; tests of closing turn it on (or run
# close_period). Stack.env sets it too, for stacks given settings of their own.
TEST_SETTINGS = {
    "BILLING_CLOSE_CHECK_INTERVAL_S": "0",
    "BILLING_SHUTDOWN_GRACE_S": "2",
    "BILLING_CATALOG_REFRESH_S": "0.5",
    "ANALYTICS_BILLED_REFRESH_S": "1",
    "ANALYTICS_CATALOG_REFRESH_S": "0.5",
}


@dataclass
class Stack(ProcessStack):
    """The four services on the tests' servers, with the tests' admin token and timers."""

    admin_token: str | None = ADMIN_TOKEN
    rabbitmq_url: str = RABBITMQ_URL
    mongodb_url: str = MONGODB_URL
    redis_url: str = REDIS_URL
    settings: dict[str, str] = field(default_factory=lambda: dict(TEST_SETTINGS))

    def env(self) -> dict[str, str]:
        return {"BILLING_CLOSE_CHECK_INTERVAL_S": "0", **super().env()}

    def ledger(self) -> MongoLedger:
        return MongoLedger.connect(self.mongodb_url, self.database, timeout_s=5)

    def cache(self) -> RedisCache:
        return RedisCache(self.redis_url, self.redis_prefix, timeout_s=5)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = Stack(prefix=f"e2e{uuid.uuid4().hex[:8]}-", log_dir=tmp_path_factory.mktemp("logs"))
    async with running(stack):
        yield stack


@asynccontextmanager
async def running(stack: Stack) -> AsyncIterator[Stack]:
    """The stack started for a module's tests, still running after them, stopped and cleaned."""
    try:
        await stack.start()
        yield stack
        stack.assert_running()
    finally:
        await stack.stop()
        await stack.clean()


# A broker several times slower than this machine's: ingestion's connection goes through a
# proxy that forwards at most 4 KiB per 12.5 ms each way (330 kB/s): about 1,000 messages/s
# of one reading (the broker confirmed 3,400-4,400/s to ingestion's publisher here and
# 2,000/s on the slowest machine measured), about 2,000 readings/s in messages of many, where
# the bytes are the limit (test_backpressure.py prints the factor of each run).
SLOW_BROKER_WRITE_DELAY_S = 0.0125
SLOW_BROKER_CHUNK_BYTES = 4096


@pytest.fixture(scope="module")
async def slow_broker_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """The stack with ingestion publishing through the slowed proxy; the consumers connect
    to the broker directly."""
    proxy = TcpProxy.to_url(RABBITMQ_URL, SLOW_BROKER_WRITE_DELAY_S, SLOW_BROKER_CHUNK_BYTES)
    await proxy.start()
    stack = Stack(
        prefix=f"e2e{uuid.uuid4().hex[:8]}-",
        log_dir=tmp_path_factory.mktemp("logs"),
        settings={
            **TEST_SETTINGS,
            "INGESTION_RABBITMQ_URL": proxy.url(RABBITMQ_URL),
            # The bound test_backpressure's loads are sized against (four times it at once).
            "INGESTION_MAX_IN_FLIGHT_READINGS": "2000",
        },
    )
    try:
        async with running(stack):
            yield stack
    finally:
        await proxy.cut()


def write_csv(path: Path, readings: Iterable[Reading]) -> None:
    """The readings as an import file; no reading_id, so the gateway derives the same one."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("device_id", "timestamp", "usage_kwh"))
        writer.writerows(
            (r.device_id, r.timestamp.isoformat(), repr(r.usage_kwh)) for r in readings
        )


async def send_resending(
    stack: Stack, readings: Iterable[Reading], csv_path: Path, batch: int, streams: int
) -> ImportSummary:
    """Send ``readings`` in order as SendReadings streams of ``batch``, ``streams`` at a time.

    scripts.import_csv does the sending, so the tests resend as a logger or an import does:
    a stream refused with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED is sent
    again (whole: what was accepted is deduplicated by reading_id) after the server's retry
    hint or an exponential, jittered backoff of at most 5 s, until every stream is through
    or RESEND_FOR_S passes.
    """
    write_csv(csv_path, readings)
    config = ImportConfig(
        csv_path,
        target=stack.gateway,
        batch=batch,
        streams=streams,
        timeout_s=120,
        retries=1_000_000,  # RESEND_FOR_S ends the resending, not a count
        retry_initial_s=0.5,
        retry_max_s=5,
        show_progress=False,
        token=ADMIN_TOKEN,
    )
    try:
        async with asyncio.timeout(RESEND_FOR_S):
            summary = await import_csv(config)
    except TimeoutError:
        raise AssertionError(
            f"{csv_path.name}: streams still refused after resending for {RESEND_FOR_S} s\n"
            + stack.logs()
        ) from None
    assert summary.ok, f"{summary.render()}\n{stack.logs()}"
    assert summary.rejected == 0, summary.report_problems()
    return summary
