"""The services as processes (``python -m <service>``): the one launcher of the benches and
of the end-to-end and fault tests.

A :class:`Stack` starts the four services, or a subset (billing alone, the gateway alone),
on free ports with the environment it is given, isolated by a topology prefix, a database
and a Redis key prefix; waits until each is healthy; stops them with SIGTERM; and removes
the exchanges, queues, database and keys they made.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import aio_pika
import httpx
import pymongo
import redis.asyncio as redis

from common.healthcheck import check_grpc, check_http
from common.rabbit import Topology, delete_topology
from scripts.bench.measure import free_port, metric_value

SERVICES = ("ingestion_service", "billing_service", "analytics_service", "api_gateway")
# The settings prefix of each service, which names its port variables.
SETTINGS_PREFIX = {
    "ingestion_service": "INGESTION",
    "billing_service": "BILLING",
    "analytics_service": "ANALYTICS",
    "api_gateway": "GATEWAY",
}
# The ports each service listens on, by variable (analytics serves only /metrics; the
# gateway HTTP/JSON too).
PORTS = {
    service: ((f"{prefix}_PORT",) if service != "analytics_service" else ())
    + (("GATEWAY_HTTP_PORT",) if service == "api_gateway" else ())
    + (f"{prefix}_METRICS_PORT",)
    for service, prefix in SETTINGS_PREFIX.items()
}
Ready = Literal["health", "metrics"]
# The local servers of make services, unless the environment names others.
SERVER_URLS = {
    "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/",
    "MONGODB_URL": "mongodb://127.0.0.1:27017/",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


def server_url(name: str) -> str:
    """``RABBITMQ_URL``, ``MONGODB_URL`` or ``REDIS_URL`` from the environment, or the default."""
    return os.environ.get(name, SERVER_URLS[name])


@dataclass
class Stack:
    """Services started as processes under ``prefix``; ``services`` picks a subset.

    ``settings`` and then ``extra_env`` override the environment the services get;
    ``python`` and ``cwd`` are the interpreter and working directory that run them (by
    default this one and the current folder: the source tree).
    """

    prefix: str
    log_dir: Path
    services: tuple[str, ...] = SERVICES
    admin_token: str | None = None
    database: str = ""  # default: the prefix without dashes
    redis_prefix: str = ""  # default: the prefix
    rabbitmq_url: str = field(default_factory=lambda: server_url("RABBITMQ_URL"))
    mongodb_url: str = field(default_factory=lambda: server_url("MONGODB_URL"))
    redis_url: str = field(default_factory=lambda: server_url("REDIS_URL"))
    settings: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    cwd: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    log_files: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.database = self.database or self.prefix.strip("-")
        self.redis_prefix = self.redis_prefix or self.prefix

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['GATEWAY_PORT']}"

    @property
    def gateway_http(self) -> str:
        """Base URL of the gateway's HTTP/JSON API."""
        return f"http://127.0.0.1:{self.ports['GATEWAY_HTTP_PORT']}"

    @property
    def pids(self) -> dict[str, int]:
        return {service: process.pid for service, process in self.processes.items()}

    def metrics_url(self, service: str) -> str:
        """/metrics of a service, by its settings prefix (``BILLING``)."""
        return f"http://127.0.0.1:{self.ports[f'{service}_METRICS_PORT']}/metrics"

    def env(self) -> dict[str, str]:
        ports = self.ports
        env = {
            **os.environ,
            **{name: str(port) for name, port in ports.items()},
            "TOPOLOGY_PREFIX": self.prefix,
            "MONGODB_DATABASE": self.database,
            "REDIS_KEY_PREFIX": self.redis_prefix,
            "RABBITMQ_URL": self.rabbitmq_url,
            "MONGODB_URL": self.mongodb_url,
            "REDIS_URL": self.redis_url,
        }
        if "INGESTION_PORT" in ports:
            env["GATEWAY_INGESTION_ADDR"] = f"127.0.0.1:{ports['INGESTION_PORT']}"
        if "BILLING_PORT" in ports:
            env["GATEWAY_BILLING_ADDR"] = f"127.0.0.1:{ports['BILLING_PORT']}"
            env["ANALYTICS_BILLING_ADDR"] = f"127.0.0.1:{ports['BILLING_PORT']}"
        if self.admin_token:
            env["GATEWAY_ADMIN_TOKEN"] = self.admin_token
        return {**env, **self.settings, **self.extra_env}

    async def start(self, ready: Ready = "health", timeout_s: float = 30) -> None:
        """Start the services on free ports; wait until each is healthy (gRPC health, or
        /metrics for analytics), or with ``ready="metrics"`` until each /metrics answers."""
        for service in self.services:
            for name in PORTS[service]:
                port = free_port()
                while port in self.ports.values():  # bind(0) may hand out a port twice
                    port = free_port()
                self.ports[name] = port
        for service in self.services:
            await self._spawn(service, service)
        await self._wait(self.services, ready, timeout_s, "stack not healthy")

    async def _spawn(self, service: str, log_name: str) -> None:
        log = (self.log_dir / f"{log_name}.log").open("wb")  # the child keeps its own fd
        self.log_files.append(log)
        self.processes[service] = await asyncio.create_subprocess_exec(
            self.python, "-m", service, env=self.env(), stdout=log, stderr=log, cwd=self.cwd
        )

    async def _wait(
        self, services: tuple[str, ...], ready: Ready, timeout_s: float, failure: str
    ) -> None:
        probes = [self._probe(service, ready) for service in services]
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            self.assert_running()
            problems = [p for p in await asyncio.gather(*map(asyncio.to_thread, probes)) if p]
            if not problems:
                return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{failure} in {timeout_s:g} s: {problems}\n{self.logs()}")
            await asyncio.sleep(0.1)

    def _probe(self, service: str, ready: Ready):  # type: ignore[no-untyped-def]
        prefix = SETTINGS_PREFIX[service]
        if ready == "metrics" or service == "analytics_service":
            return lambda: check_http(self.metrics_url(prefix))
        return lambda: check_grpc(f"127.0.0.1:{self.ports[f'{prefix}_PORT']}")

    async def stop_service(self, service: str, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (SIGTERM: graceful, SIGKILL: crash) and wait for the exit."""
        process = self.processes[service]
        process.send_signal(sig)
        await asyncio.wait_for(process.wait(), timeout=30)

    async def start_service(self, service: str) -> None:
        """Start a stopped service again and wait until its /metrics answers."""
        await self._spawn(service, f"{service}.{len(self.log_files)}")
        await self._wait((service,), "metrics", 30, f"{service} did not come back")

    async def restart(self, service: str) -> None:
        await self.stop_service(service)
        await self.start_service(service)

    def assert_running(self) -> None:
        for service, process in self.processes.items():
            if process.returncode is not None:
                raise AssertionError(f"{service} exited {process.returncode}\n{self.logs()}")

    async def metric(self, service: str, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample from a service's live /metrics (0 when absent)."""
        async with httpx.AsyncClient(timeout=5) as client:
            text = (await client.get(self.metrics_url(service))).text
        return metric_value(text, name, labels)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text()[-3000:]}" for path in self.log_dir.glob("*.log")
        )

    async def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM every service still running and wait for it (then SIGKILL)."""
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                await asyncio.wait_for(process.wait(), timeout=timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()
        for log in self.log_files:
            log.close()

    async def clean(self) -> None:
        """Drop what the services made: the database, the Redis keys, exchanges and queues."""
        await asyncio.to_thread(self._drop_database)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            keys = [key async for key in client.scan_iter(f"{self.redis_prefix}*", count=10_000)]
            for start in range(0, len(keys), 10_000):
                await client.delete(*keys[start : start + 10_000])
        finally:
            await client.aclose()
        connection = await aio_pika.connect(self.rabbitmq_url, timeout=10)
        async with connection:
            await delete_topology(await connection.channel(), self.topology)

    def _drop_database(self) -> None:
        with pymongo.MongoClient(self.mongodb_url, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(self.database)

    async def settled(self, limit_s: float) -> bool:
        """Wait until billing and analytics hold no delivery unsettled (what they took before
        a purge, up to their prefetch); False if they still do after ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while True:
            held = [
                await self.metric(service, "consumer_unsettled_messages")
                for service in ("BILLING", "ANALYTICS")
            ]
            if not any(held):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    async def purge(self) -> int:
        """Empty the billing and analytics queues; returns the messages dropped."""
        connection = await aio_pika.connect(self.rabbitmq_url, timeout=10)
        async with connection:
            channel = await connection.channel()
            dropped = 0
            for name in (self.topology.billing_queue, self.topology.analytics_queue):
                queue = await channel.declare_queue(name, passive=True)
                result = await queue.purge(timeout=30)
                dropped += int(result.message_count or 0)
            return dropped
