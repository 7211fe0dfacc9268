"""Benchmark (not a test): what device auth and rate limiting cost per reading.

    python -m scripts.bench auth --calls 3000

Runs the real api_gateway as a process three times: auth and limits off, device-token auth
on, then auth and Redis rate limits on. Each time it registers a device, then sends
``--calls`` unary SendReading calls one at a time (latency) and the same again from 16
concurrent callers (throughput). The gateway forwards to a fake ingestion in this process
that confirms at once, so the figures are the gateway's own work plus the checks. Needs
MongoDB (SecantusDB locally) and Redis (make services).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import grpc
import typer

from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, ingestion_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from scripts.bench.fakes import CountingIngestion
from scripts.bench.stack import Stack
from scripts.simulate import percentile

ADMIN_TOKEN = "bench-admin-token-0123456789"
VARIANTS = {
    "auth off, limits off": {
        "GATEWAY_AUTH_ENABLED": "false",
        "GATEWAY_GLOBAL_RATE_PER_S": "0",
        "GATEWAY_DEVICE_RATE_PER_S": "0",
    },
    "device token": {"GATEWAY_GLOBAL_RATE_PER_S": "0", "GATEWAY_DEVICE_RATE_PER_S": "0"},
    "device token + rate limits": {
        "GATEWAY_DEVICE_RATE_PER_S": "1000000",
        "GATEWAY_DEVICE_BURST": "1000000",
    },
}


def reading(device: str, index: int) -> gateway_pb2.SendReadingRequest:
    message = reading_pb2.Reading(device_id=device, usage_kwh=0.25)
    message.timestamp.FromDatetime(datetime.now(UTC) - timedelta(days=1, seconds=index))
    return gateway_pb2.SendReadingRequest(reading=message)


async def measure(name: str, env: dict[str, str], ingestion_port: int, calls: int) -> dict:
    run = f"{os.getpid()}-{time.monotonic_ns()}"
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as logs:
        gateway = Stack(
            prefix=f"bench-auth-{run}:",
            log_dir=Path(logs),
            services=("api_gateway",),
            admin_token=ADMIN_TOKEN,
            database=f"bench-auth-{run}"[:60],
            settings={
                "GATEWAY_INGESTION_ADDR": f"127.0.0.1:{ingestion_port}",
                "LOG_LEVEL": "WARNING",
            },
            extra_env=env,
        )
        try:
            await gateway.start()
            return await _calls(name, env, gateway.gateway, calls)
        finally:
            await gateway.stop()
            await gateway.clean()


async def _calls(name: str, env: dict[str, str], target: str, calls: int) -> dict:
    async with gateway_channel(target, ADMIN_TOKEN) as admin_channel:
        token = ADMIN_TOKEN
        if env.get("GATEWAY_AUTH_ENABLED") != "false":
            answer = await gateway_pb2_grpc.DeviceAdminStub(admin_channel).RegisterDevice(
                gateway_pb2.RegisterDeviceRequest(device_id="bench-auth-1"), timeout=10
            )
            token = answer.token
    async with gateway_channel(target, token) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for index in range(200):  # warm up connections and caches
            await stub.SendReading(reading("bench-auth-1", index), timeout=10)
        latencies = []
        for index in range(calls):
            started = time.perf_counter()
            await stub.SendReading(reading("bench-auth-1", 1000 + index), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        began, sent = time.perf_counter(), iter(range(calls))

        async def caller() -> None:
            for index in sent:
                await stub.SendReading(reading("bench-auth-1", 10**6 + index), timeout=10)

        await asyncio.gather(*(caller() for _ in range(16)))
        throughput = calls / (time.perf_counter() - began)
    return {
        "variant": name,
        "p50_ms": round(percentile(latencies, 50), 3),
        "p95_ms": round(percentile(latencies, 95), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "readings_per_s_16_callers": round(throughput),
    }


async def run(calls: int) -> list[dict]:
    server = grpc.aio.server()
    ingestion_pb2_grpc.add_IngestionServicer_to_server(CountingIngestion(), server)
    ingestion_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        return [await measure(name, env, ingestion_port, calls) for name, env in VARIANTS.items()]
    finally:
        await server.stop(None)


def main(
    calls: Annotated[int, typer.Option(min=100, help="Calls per measurement.")] = 3000,
) -> None:
    results = asyncio.run(run(calls))
    base = results[0]["p50_ms"]
    typer.echo(
        f"{'variant':<28} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'r/s x16':>8}"
    )
    for row in results:
        latency = " ".join(f"{row[key]:>8.3f}" for key in ("p50_ms", "p95_ms", "p99_ms"))
        typer.echo(
            f"{row['variant']:<28} {latency} {row['p50_ms'] - base:>8.3f} "
            f"{row['readings_per_s_16_callers']:>8}"
        )
    typer.echo(json.dumps(results))
