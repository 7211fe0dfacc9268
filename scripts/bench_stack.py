"""The services ``make bench`` loads: the running ones, or four it starts itself.

When something answers on the gateway target, the bench uses that stack (``make dev``:
default ports and topology). Otherwise it starts the four services as processes on free
ports, isolated by a bench topology prefix, database and Redis key prefix, and removes all
of it at the end. Also here: which process listens on a port, its peak RSS, and a sample
of a Prometheus counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import pymongo
import redis
from prometheus_client.parser import text_string_to_metric_families

from common.healthcheck import check_grpc, check_http
from common.rabbit import Topology, delete_topology

SERVICES = ("ingestion_service", "billing_service", "analytics_service", "api_gateway")
# make dev's ports (the settings' defaults): where a running stack's pieces are found.
DEFAULT_LISTEN_PORTS = {
    "api_gateway": 50051,
    "ingestion_service": 50052,
    "billing_service": 50053,
    "analytics_service": 9100,
}
# The local MongoDB-wire server of make services, by its process name in /proc.
MONGODB_PROCESS = "secantusd-py"
DEFAULT_BILLING_METRICS_URL = "http://127.0.0.1:9103/metrics"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(target: str) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def pid_listening_on(port: int) -> int | None:
    """The process that listens on TCP ``port`` (from /proc; None when not found)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def memory_mib(pid: int) -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of a process, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = round(int(rest.split()[0]) / 1024, 1)  # kB
    return {"peak_rss_mib": values.get("VmHWM", 0.0), "rss_mib": values.get("VmRSS", 0.0)}


def cpu_by_name() -> dict[str, float]:
    """CPU seconds so far of the servers on this machine, by process name (from /proc)."""
    found: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            values = fields[1].split()
        except (OSError, IndexError):
            continue
        found[name] = found.get(name, 0.0) + _ticks(values)
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds (user+sys) a process has used so far; 0 when it is gone."""
    try:
        return _ticks(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())
    except OSError:
        return 0.0


def _ticks(values: list[str]) -> float:
    # utime and stime are fields 14 and 15 of /proc/PID/stat, 12 and 13 after the name
    return (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")


def counter(url: str, name: str, labels: dict[str, str]) -> float:
    """One sample of a Prometheus text endpoint (0 when absent)."""
    with _NO_PROXY.open(url, timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


@dataclass
class BenchStack:
    """Where the services are, and whether the bench started (and so owns) them."""

    target: str
    topology: Topology
    billing_metrics_url: str
    pids: dict[str, int]
    owned: bool = False
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None
    database: str = ""
    rabbitmq_url: str = ""
    mongodb_url: str = ""
    redis_url: str = ""

    @classmethod
    def running(cls, target: str, topology_prefix: str, billing_metrics_url: str) -> BenchStack:
        """The stack already serving ``target``; the other services on make dev's ports."""
        ports = {**DEFAULT_LISTEN_PORTS, "api_gateway": int(target.rsplit(":", 1)[1])}
        pids = {name: pid for name, port in ports.items() if (pid := pid_listening_on(port))}
        return cls(target, Topology(topology_prefix), billing_metrics_url, pids)

    @classmethod
    def start(cls, token: str, prefix: str, urls: dict[str, str], timeout_s: float) -> BenchStack:
        """Start the four services on free ports under ``prefix``; wait until all are up."""
        ports = {
            name: free_port()
            for name in (
                "GATEWAY_PORT",
                "GATEWAY_METRICS_PORT",
                "INGESTION_PORT",
                "INGESTION_METRICS_PORT",
                "BILLING_PORT",
                "BILLING_METRICS_PORT",
                "ANALYTICS_METRICS_PORT",
            )
        }
        database = prefix.strip("-")
        env = {
            **os.environ,
            **{name: str(port) for name, port in ports.items()},
            "GATEWAY_INGESTION_ADDR": f"127.0.0.1:{ports['INGESTION_PORT']}",
            "GATEWAY_BILLING_ADDR": f"127.0.0.1:{ports['BILLING_PORT']}",
            "ANALYTICS_BILLING_ADDR": f"127.0.0.1:{ports['BILLING_PORT']}",
            "GATEWAY_ADMIN_TOKEN": token,
            "TOPOLOGY_PREFIX": prefix,
            "MONGODB_DATABASE": database,
            "REDIS_KEY_PREFIX": prefix,
            "RABBITMQ_URL": urls["rabbitmq"],
            "MONGODB_URL": urls["mongodb"],
            "REDIS_URL": urls["redis"],
        }
        log_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}logs-"))
        stack = cls(
            target=f"127.0.0.1:{ports['GATEWAY_PORT']}",
            topology=Topology(prefix),
            billing_metrics_url=f"http://127.0.0.1:{ports['BILLING_METRICS_PORT']}/metrics",
            pids={},
            owned=True,
            log_dir=log_dir,
            database=database,
            rabbitmq_url=urls["rabbitmq"],
            mongodb_url=urls["mongodb"],
            redis_url=urls["redis"],
        )
        for service in SERVICES:
            with (log_dir / f"{service}.log").open("wb") as log:  # the child keeps its own fd
                process = subprocess.Popen(
                    [sys.executable, "-m", service], env=env, stdout=log, stderr=log
                )
            stack.processes[service] = process
            stack.pids[service] = process.pid
        probes = [
            lambda: check_grpc(f"127.0.0.1:{ports['INGESTION_PORT']}"),
            lambda: check_grpc(f"127.0.0.1:{ports['BILLING_PORT']}"),
            lambda: check_grpc(stack.target),
            lambda: check_http(f"http://127.0.0.1:{ports['ANALYTICS_METRICS_PORT']}/metrics"),
        ]
        deadline = time.monotonic() + timeout_s
        while problems := [p for probe in probes if (p := probe())]:
            exited = {s: p.returncode for s, p in stack.processes.items() if p.poll() is not None}
            if exited or time.monotonic() > deadline:
                stack.stop()
                with contextlib.suppress(Exception):  # whatever it declared before failing
                    stack.clean()
                raise RuntimeError(f"bench stack not up: {exited or problems}; logs in {log_dir}")
            time.sleep(0.2)
        return stack

    def stop(self) -> None:
        """SIGTERM the services the bench started and wait for them (then SIGKILL)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def clean(self) -> None:
        """Drop what the bench's own stack left: database, Redis keys, exchanges and queues."""
        if not self.owned:
            return
        with pymongo.MongoClient(self.mongodb_url, serverSelectionTimeoutMS=5000) as client:
            client.drop_database(self.database)
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        try:
            keys = list(client.scan_iter(f"{self.topology.prefix}*", count=10_000))
            for start in range(0, len(keys), 10_000):
                client.delete(*keys[start : start + 10_000])
        finally:
            client.close()
        asyncio.run(self._delete_topology())

    async def _delete_topology(self) -> None:
        connection = await aio_pika.connect(self.rabbitmq_url, timeout=10)
        async with connection:
            await delete_topology(await connection.channel(), self.topology)

    def purge(self) -> int:
        """Empty the bench's own billing and analytics queues (never a stack it did not start)
        so that a backlog from one figure does not load the next; returns messages dropped."""
        if not self.owned:
            return 0

        async def purge() -> int:
            connection = await aio_pika.connect(self.rabbitmq_url, timeout=10)
            async with connection:
                channel = await connection.channel()
                dropped = 0
                for name in (self.topology.billing_queue, self.topology.analytics_queue):
                    queue = await channel.declare_queue(name, passive=True)
                    result = await queue.purge(timeout=30)
                    dropped += int(result.message_count or 0)
                return dropped

        return asyncio.run(purge())

    def billed(self) -> float:
        """billing_readings_total{result="billed"} now."""
        return counter(self.billing_metrics_url, "billing_readings_total", {"result": "billed"})

    def store_retries(self) -> float:
        """billing_store_retries_total now: retries after a transient MongoDB failure."""
        return counter(self.billing_metrics_url, "billing_store_retries_total", {})

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each service, RabbitMQ and the MongoDB server."""
        found = {service: process_cpu(pid) for service, pid in self.pids.items()}
        servers = cpu_by_name()
        found["rabbitmq"] = servers.get("beam.smp", 0.0)
        found["mongodb"] = servers.get(MONGODB_PROCESS, 0.0)
        return found

    def memory(self) -> dict[str, dict[str, float]]:
        """Peak and current RSS of each service found (a stopped one is left out)."""
        found = {}
        for service, pid in self.pids.items():
            try:
                found[service] = {"pid": pid, **memory_mib(pid)}
            except OSError:
                continue
        return found
