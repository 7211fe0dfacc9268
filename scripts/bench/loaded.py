"""The services a bench of the whole platform loads: the running ones (make dev), found by
make dev's ports, or a :class:`~scripts.bench.stack.Stack` it started itself; and what it
reads of them (billed readings, CPU time, RSS)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import typer

from common.rabbit import Topology
from scripts.bench.measure import counter, memory_mib, pid_listening_on, process_cpu
from scripts.bench.stack import Stack, server_url

# make dev's ports (the settings' defaults): where a running stack's pieces are found.
DEFAULT_LISTEN_PORTS = {
    "api_gateway": 50051,
    "ingestion_service": 50052,
    "billing_service": 50053,
    "analytics_service": 9100,
}
DEFAULT_BILLING_METRICS_URL = "http://127.0.0.1:9103/metrics"
# How long a purge waits for the consumers to settle what they hold (billing's prefetch).
SETTLE_LIMIT_S = 300.0


@dataclass
class BenchStack:
    """Where the services are; ``owned`` is the stack the bench started (None: a running one)."""

    target: str
    topology: Topology
    billing_metrics_url: str
    pids: dict[str, int]
    owned: Stack | None = None
    _server_pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def running(cls, target: str, topology_prefix: str, billing_metrics_url: str) -> BenchStack:
        """The stack already serving ``target``; the other services on make dev's ports."""
        ports = {**DEFAULT_LISTEN_PORTS, "api_gateway": int(target.rsplit(":", 1)[1])}
        pids = {name: pid for name, port in ports.items() if (pid := pid_listening_on(port))}
        return cls(target, Topology(topology_prefix), billing_metrics_url, pids)

    @classmethod
    def of(cls, stack: Stack) -> BenchStack:
        return cls(stack.gateway, stack.topology, stack.metrics_url("BILLING"), stack.pids, stack)

    def purge(self) -> int:
        """Empty the bench's own billing and analytics queues (never a stack it did not start)
        and wait until both have settled what they had already taken, which a purge cannot
        reach (billing's prefetch holds up to 100,000 readings: a minute of its work on a
        small machine), so that a backlog from one figure does not load the next; returns
        the messages dropped."""
        if self.owned is None:
            return 0
        dropped = asyncio.run(self.owned.purge())
        if not asyncio.run(self.owned.settled(SETTLE_LIMIT_S)):
            typer.echo(
                f"[bench] billing or analytics still held deliveries {SETTLE_LIMIT_S:g} s after "
                "the purge: the next figure carries their backlog",
                err=True,
            )
        return dropped

    def billed(self) -> float:
        """billing_readings_total{result="billed"} now."""
        return counter(self.billing_metrics_url, "billing_readings_total", {"result": "billed"})

    def store_retries(self) -> float:
        """billing_store_retries_total now: retries after a transient MongoDB failure."""
        return counter(self.billing_metrics_url, "billing_store_retries_total", {})

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each service, RabbitMQ and the MongoDB server."""
        found = {service: process_cpu(pid) for service, pid in self.pids.items()}
        for server, pid in self.server_pids().items():
            found[server] = process_cpu(pid)
        return found

    def server_pids(self) -> dict[str, int]:
        """The broker and the MongoDB server the services use, by the port each listens on
        (looked up once): by process name, another broker node a test starts and stops
        beside them would count too, and its exit would make a difference negative."""
        if not self._server_pids:
            for server, variable in (("rabbitmq", "RABBITMQ_URL"), ("mongodb", "MONGODB_URL")):
                port = urlsplit(server_url(variable)).port
                if port is not None and (pid := pid_listening_on(port)) is not None:
                    self._server_pids[server] = pid
        return self._server_pids

    def memory(self) -> dict[str, dict[str, float]]:
        """Peak and current RSS of each service found (a stopped one is left out)."""
        found = {}
        for service, pid in self.pids.items():
            try:
                found[service] = {"pid": pid, **memory_mib(pid)}
            except OSError:
                continue
        return found
