"""The four services as real processes (python -m ...), isolated by names and ports."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest
import redis.asyncio as redis
from prometheus_client.parser import text_string_to_metric_families

from billing_service.adapters.mongo import MongoLedger
from billing_service.adapters.redis import RedisCache
from common.healthcheck import check_grpc, check_http
from common.models import Reading
from scripts.import_csv import ImportConfig, ImportSummary, import_csv
from tests.conftest import (
    ADMIN_TOKEN,
    MONGODB_URL,
    RABBITMQ_URL,
    REDIS_URL,
    delete_topology,
    free_port,
)

SERVICES = ("ingestion_service", "billing_service", "analytics_service", "api_gateway")
# How long a test's client resends what the gateway refused under backpressure (on the slower
# machines RabbitMQ confirms ~2,000 persistent messages/s and forwards meet their deadline).
RESEND_FOR_S = 300


@dataclass
class Stack:
    prefix: str
    log_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    log_files: list[IO[bytes]] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    # The interpreter and working directory of the services: by default this venv and the
    # repository (so the source tree); tests/e2e/test_runtime_install.py passes an installed one.
    python: str = sys.executable
    cwd: Path | None = None

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['GATEWAY_PORT']}"

    @property
    def database(self) -> str:
        return self.prefix.strip("-")

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **{name: str(port) for name, port in self.ports.items()},
            "GATEWAY_INGESTION_ADDR": f"127.0.0.1:{self.ports['INGESTION_PORT']}",
            "GATEWAY_BILLING_ADDR": f"127.0.0.1:{self.ports['BILLING_PORT']}",
            "TOPOLOGY_PREFIX": self.prefix,
            "MONGODB_DATABASE": self.database,
            "REDIS_KEY_PREFIX": self.prefix,
            "RABBITMQ_URL": RABBITMQ_URL,
            "MONGODB_URL": MONGODB_URL,
            "REDIS_URL": REDIS_URL,
            "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "BILLING_SHUTDOWN_GRACE_S": "2",
            "BILLING_CATALOG_REFRESH_S": "0.5",
            "ANALYTICS_BILLING_ADDR": f"127.0.0.1:{self.ports['BILLING_PORT']}",
            "ANALYTICS_BILLED_REFRESH_S": "1",
            "ANALYTICS_CATALOG_REFRESH_S": "0.5",
            **self.extra_env,
        }

    async def start(self) -> None:
        for name in (
            "GATEWAY_PORT",
            "GATEWAY_METRICS_PORT",
            "INGESTION_PORT",
            "INGESTION_METRICS_PORT",
            "BILLING_PORT",
            "BILLING_METRICS_PORT",
            "ANALYTICS_METRICS_PORT",
        ):
            port = free_port()
            while port in self.ports.values():  # bind(0) may hand out a port twice in a row
                port = free_port()
            self.ports[name] = port
        for service in SERVICES:
            log = self._open_log(service)
            self.processes[service] = await asyncio.create_subprocess_exec(
                self.python, "-m", service, env=self.env(), stdout=log, stderr=log, cwd=self.cwd
            )
        probes = [
            lambda: check_grpc(f"127.0.0.1:{self.ports['INGESTION_PORT']}"),
            lambda: check_grpc(f"127.0.0.1:{self.ports['BILLING_PORT']}"),
            lambda: check_grpc(self.gateway),
            lambda: check_http(self.metrics_url("ANALYTICS")),
        ]
        for _ in range(300):
            self.assert_running()
            problems = [p for p in await asyncio.gather(*map(asyncio.to_thread, probes)) if p]
            if not problems:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"stack not healthy in 30 s: {problems}\n{self.logs()}")

    def _open_log(self, service: str) -> IO[bytes]:
        log = (self.log_dir / f"{service}.log").open("wb")
        self.log_files.append(log)
        return log

    async def stop_service(self, service: str, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGTERM: graceful, SIGKILL: crash) and wait for the exit."""
        process = self.processes[service]
        process.send_signal(sig)
        await asyncio.wait_for(process.wait(), timeout=30)

    async def start_service(self, service: str) -> None:
        """Start a stopped service again and wait until its /metrics answers."""
        log = self._open_log(f"{service}.{len(self.log_files)}")
        self.processes[service] = await asyncio.create_subprocess_exec(
            self.python, "-m", service, env=self.env(), stdout=log, stderr=log, cwd=self.cwd
        )
        prefix = {"api_gateway": "GATEWAY"}.get(service, service.split("_")[0].upper())
        for _ in range(300):
            self.assert_running()
            if await asyncio.to_thread(check_http, self.metrics_url(prefix)) is None:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{service} did not come back\n{self.logs()}")

    async def restart(self, service: str) -> None:
        await self.stop_service(service)
        await self.start_service(service)

    def assert_running(self) -> None:
        for service, process in self.processes.items():
            if process.returncode is not None:
                raise AssertionError(f"{service} exited {process.returncode}\n{self.logs()}")

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[f'{service}_METRICS_PORT']}/metrics"

    async def metric(self, service: str, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from a service's live /metrics (0 when absent)."""
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(self.metrics_url(service))).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and (labels or {}).items() <= sample.labels.items():
                    return float(sample.value)
        return 0.0

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-3000:]}" for path in self.log_dir.glob("*.log")
        )

    async def stop(self) -> None:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await process.wait()
        for log in self.log_files:
            log.close()

    def ledger(self) -> MongoLedger:
        return MongoLedger.connect(MONGODB_URL, self.database, timeout_s=5)

    def cache(self) -> RedisCache:
        return RedisCache(REDIS_URL, self.prefix, timeout_s=5)

    async def clean(self) -> None:
        ledger = self.ledger()
        await ledger.database.client.drop_database(self.database)
        ledger.close()
        client = redis.Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(f"{self.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await delete_topology(self.prefix)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    stack = Stack(prefix=f"e2e{uuid.uuid4().hex[:8]}-", log_dir=tmp_path_factory.mktemp("logs"))
    try:
        await stack.start()
        yield stack
        stack.assert_running()
    finally:
        await stack.stop()
        await stack.clean()


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
    again (whole: what was accepted is deduplicated by reading_id) after an exponential,
    jittered backoff of at most 5 s, until every stream is through or RESEND_FOR_S passes.
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
