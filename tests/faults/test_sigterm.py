"""SIGTERM to one service under steady load, then a restart: every OK reading billed once.

For each service: it exits 0 within its grace period (plus a margin) and logs how long the
shutdown took; RabbitMQ has no consumer of its left on the queues and saw its AMQP
connections closed by the client (``closing AMQP connection`` at info level, not ``client
unexpectedly closed TCP connection``), found through the process's own sockets so other
clients of the broker cannot confuse the check. A consumer (billing, analytics) finishes
within its grace every delivery it held at the signal; billing is signalled while it
provably holds some (a batch it cannot write yet). Prints, per service: readings in flight
at the signal, time to exit, readings the load had to resend.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import grpc
import httpx
import pytest

from common.energy.v1 import billing_pb2, gateway_pb2_grpc
from common.gateway_client import gateway_channel
from common.rabbit import Topology
from tests.conftest import (
    ADMIN_TOKEN,
    RABBITMQ_MANAGEMENT_URL,
    RABBITMQ_URL,
    ready_count,
    ready_once_unconsumed,
    wait_for_unacked,
    wait_until,
)
from tests.e2e.conftest import Stack
from tests.faults.load import reconciled, steady_load, steady_load_until

# Each test waits up to load.RECONCILE_WAIT_S for billing after its fault.
pytestmark = pytest.mark.timeout(600)

GRACE_S = 5.0
RATE = 40  # readings/s of each of the two loads, unary and streamed
BURST_RATE = 400
MARGIN_S = 3.0  # closing connections (bounded at 5 s each, well under 1 s here) and exit
GRACE_ENV = {
    f"{prefix}_SHUTDOWN_GRACE_S": str(GRACE_S)
    for prefix in ("GATEWAY", "INGESTION", "BILLING", "ANALYTICS")
}
AMQP_SERVICES = ("ingestion_service", "billing_service", "analytics_service")
CONSUMERS = ("billing_service", "analytics_service")


class NoShutdownLine(AssertionError):
    """The service logged no ``shutdown completed`` line."""


@pytest.mark.parametrize(
    "service",
    [
        "ingestion_service",
        "billing_service",
        "analytics_service",
        "api_gateway",
    ],
)
async def test_sigterm_then_restart_under_load(
    stacks, catalog: Path, tmp_path: Path, service: str
) -> None:
    # While this file exists billing's MongoDB writes fail (and are retried): what billing
    # holds then stays in flight until the file goes.
    writes_fail = tmp_path / "billing-writes-fail"
    stack = await stacks(
        BILLING_FAULTS_FILE=str(writes_fail), BILLING_RETRY_MAX_DELAY_S="0.5", **GRACE_ENV
    )
    ledger = tmp_path / "ledger.jsonl"
    # A rate billing keeps up with, until the service is back and one round more: the
    # signal and the restart land under load however long they take.
    back = asyncio.Event()
    load = asyncio.gather(
        steady_load_until(stack, ledger, back, rate=RATE),
        steady_load_until(stack, ledger, back, rate=RATE, batch=25),
    )
    await wait_until(lambda: billed_some(stack), what="the load's readings billed")
    # A burst on top, so the signal finds RPCs and billing's prefetch window busy.
    published = await stack.metric("INGESTION", "ingestion_published_total")
    burst = asyncio.create_task(
        steady_load(stack, ledger, seconds=1, rate=BURST_RATE, batch=25, prefix="burst")
    )
    await wait_until(lambda: published_more(stack, published, 50), what="the burst flowing")
    process = stack.processes[service]
    amqp_ports = amqp_client_ports(process.pid) if service in AMQP_SERVICES else set()
    if service in AMQP_SERVICES:
        assert amqp_ports, f"{service} has no connection to RabbitMQ to check"
    broker_log = await broker_log_file()
    log_offset = broker_log.stat().st_size
    billing_queue = Topology(stack.prefix).billing_queue
    if service == "billing_service":
        retries = await stack.metric("BILLING", "billing_store_retries_total")
        writes_fail.write_text("timeout")
        await wait_until(
            lambda: retried_since(stack, retries), what="billing retrying a batch it holds"
        )
        held = await wait_for_unacked(billing_queue)  # the broker's view agrees
        assert held > 0
    flying = await published_not_billed(stack)

    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    if service == "billing_service":
        # Writes work again only once billing's stop is under way (it logged the signal and
        # failed a write since), so the deliveries it holds are still unacked when its
        # consumer counts what is in flight. (A quorum queue keeps counting a cancelled
        # consumer while it holds deliveries, so the broker cannot tell us it cancelled.)
        log = stack.log_dir / f"{service}.log"
        await wait_until(
            lambda: logged(log, "termination signal received"), what="billing's stop to begin"
        )
        retries = await stack.metric("BILLING", "billing_store_retries_total")
        await wait_until(lambda: retried_since(stack, retries), what="a write failing in the stop")
        writes_fail.unlink()
    await asyncio.wait_for(process.wait(), timeout=GRACE_S + MARGIN_S)
    took_s = time.monotonic() - signalled
    assert process.returncode == 0, stack.logs()
    lines = json_lines(stack.log_dir / f"{service}.log")
    consumer = next((line for line in lines if line["message"] == "consumer stopped"), None)
    shutdown = next(
        (line for line in lines if line["message"].startswith("shutdown completed")), None
    )
    if service in CONSUMERS:
        assert consumer is not None, f"{service} logged no 'consumer stopped' line"
        # The drain: every delivery held at the signal was handled and acked in the grace.
        assert consumer["left_unacked"] == 0, consumer
        assert consumer["finished"] == consumer["in_flight"], consumer
    if service == "billing_service":
        assert consumer["in_flight"] > 0, f"billing held nothing at the signal: {consumer}"

    for queue in queues_of(stack, service):
        await wait_until(
            lambda queue=queue: no_consumers(queue), timeout_s=5, what=f"no consumer on {queue}"
        )
    for port in amqp_ports:
        closing = await wait_for_close(broker_log, log_offset, port)
        assert closing.clean, f"{service}'s AMQP connection {port} ended unclean:\n{closing.text}"

    await stack.start_service(service)
    back.set()
    restarted = time.monotonic()
    unary, batched = await load
    bursted = await burst
    in_flight = consumer["in_flight"] if consumer else "-"
    print(
        f"\nSIGTERM {service}: exited 0 in {took_s:.2f} s (logged "
        f"{shutdown['shutdown_s'] if shutdown else '-'} s); handlers in flight {in_flight}, "
        f"published-not-billed {flying}; readings resent by the load "
        f"{unary.resent + batched.resent + bursted.resent}"
    )
    await reconciled(
        stack,
        ledger,
        catalog,
        f"SIGTERM {service}",
        f"{in_flight} held by the consumer, {flying} published and not billed",
        restarted,
    )
    if shutdown is None:
        raise NoShutdownLine(f"{service} logged no 'shutdown completed' line:\n{lines}")


async def billed_some(stack: Stack) -> bool:
    return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) > 0


async def published_more(stack: Stack, before: float, count: int) -> bool:
    return await stack.metric("INGESTION", "ingestion_published_total") >= before + count


async def retried_since(stack: Stack, before: float) -> bool:
    return await stack.metric("BILLING", "billing_store_retries_total") > before


async def published_not_billed(stack: Stack) -> int:
    """Readings published but not yet acked by billing (an estimate: two samples)."""
    published = await stack.metric("INGESTION", "ingestion_published_total")
    acked = await stack.metric("BILLING", "consumer_readings_total", {"outcome": "acked"})
    return max(0, int(published - acked))


def json_lines(log: Path) -> list[dict]:
    """The JSON log lines of one process (each run of a service logs to its own file)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def test_billing_past_its_grace_leaves_unwritten_readings_unacked(
    stacks, catalog: Path, tmp_path: Path
) -> None:
    """MongoDB writes failing: SIGTERM acks nothing and hands every reading back at the end
    of the grace; a second SIGTERM exits at once. Once writes work, each is billed once."""
    faults = tmp_path / "mongodb-faults"
    faults.write_text("timeout")
    stack = await stacks(
        BILLING_FAULTS_FILE=str(faults), BILLING_RETRY_MAX_DELAY_S="0.5", **GRACE_ENV
    )
    queue = Topology(stack.prefix).billing_queue
    ledger = tmp_path / "ledger.jsonl"
    sent = await steady_load(stack, ledger, seconds=1, rate=40, prefix="stuck")
    assert sent.accepted == 40

    async def all_taken() -> bool:  # delivered to billing, held unacked while it retries
        return await ready_count(queue) == 0

    await wait_until(all_taken, what="billing to take every reading")
    assert await stack.metric("BILLING", "billing_store_retries_total") > 0
    process = stack.processes["billing_service"]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), timeout=GRACE_S + MARGIN_S)
    took_s = time.monotonic() - signalled
    assert process.returncode == 0
    assert took_s >= GRACE_S, "billing did not give its in-flight readings the grace"
    stopped = next(
        line
        for line in json_lines(stack.log_dir / "billing_service.log")
        if line["message"] == "consumer stopped"
    )
    assert stopped["finished"] == 0 and stopped["left_unacked"] == stopped["in_flight"] > 0
    # Every delivery it held (all there were: none was left ready) is back in the queue.
    assert await ready_once_unconsumed(queue) == stopped["in_flight"], "not handed back"

    await stack.start_service("billing_service")
    log = Path(stack.log_files[-1].name)
    await wait_until(all_taken, what="billing to take every reading again")
    process = stack.processes["billing_service"]
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # The second signal must come while the first one's graceful stop runs.
    await wait_until(lambda: logged(log, "termination signal received"), what="the first SIGTERM")
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), timeout=MARGIN_S)
    second_s = time.monotonic() - signalled
    assert process.returncode == 128 + signal.SIGTERM
    assert second_s < GRACE_S
    assert any(line["message"].startswith("second termination signal") for line in json_lines(log))

    faults.unlink()
    await stack.start_service("billing_service")
    await wait_until(lambda: billing_reads(stack), what="reads through the gateway again")
    print(
        f"\nSIGTERM billing, writes failing: {stopped['in_flight']} in flight left unacked, "
        f"exited 0 in {took_s:.2f} s (grace {GRACE_S} s); second SIGTERM exited "
        f"{128 + signal.SIGTERM} in {second_s:.2f} s"
    )
    await reconciled(
        stack,
        ledger,
        catalog,
        "SIGTERM billing with writes failing",
        f"{stopped['in_flight']} held by billing",
        time.monotonic(),
    )


async def logged(log: Path, message_start: str) -> bool:
    """The running process has logged a message starting with ``message_start``."""
    for line in log.read_text().splitlines():  # noqa: ASYNC240 - a small file, polled
        try:
            message = json.loads(line).get("message", "")
        except ValueError:  # not JSON, or the line being written
            continue
        if message.startswith(message_start):
            return True
    return False


async def billing_reads(stack: Stack) -> bool:
    """Billing answers reads through the gateway (a restarted one takes a moment)."""
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = billing_pb2.GetLatestReadingRequest(device_id="stuck-u-00001")
        try:
            await stub.GetLatestReading(request, timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code() == grpc.StatusCode.NOT_FOUND
    return True


def queues_of(stack: Stack, service: str) -> list[str]:
    topology = Topology(stack.prefix)
    return {
        "billing_service": [topology.billing_queue],
        "analytics_service": [topology.analytics_queue],
    }.get(service, [])


async def no_consumers(queue_name: str) -> bool:
    """The broker's count of the queue's consumers, now (a passive declare, not statistics)."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.consumer_count == 0


def amqp_client_ports(pid: int) -> set[int]:
    """Local ports of the process's TCP connections to the broker, from /proc."""
    broker_port = urlsplit(RABBITMQ_URL).port or 5672
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == broker_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def broker_log_file() -> Path:
    """The RabbitMQ node's log file, as its management API names it."""
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=5) as client:
        response = await client.get(f"{RABBITMQ_MANAGEMENT_URL}/api/nodes")
        response.raise_for_status()
    files = [Path(f) for node in response.json() for f in node.get("log_files", [])]
    readable = [f for f in files if f.is_file() and os.access(f, os.R_OK)]
    assert readable, f"no readable RabbitMQ log among {files}"
    return readable[0]


@dataclass(frozen=True)
class Closing:
    """How the broker logged the end of one client connection."""

    line: str  # "closing AMQP connection ...": [info] when the client closed it
    text: str  # every line of that connection since the signal

    @property
    def clean(self) -> bool:
        return "[info]" in self.line and "unexpectedly closed" not in self.text


async def wait_for_close(log_file: Path, offset: int, port: int, timeout_s: float = 5) -> Closing:
    """The broker's log of the connection from ``port`` closing, written after ``offset``."""
    closing = re.compile(rf"closing AMQP connection (<[\d.]+>) \([\d.:\[\]a-f]+:{port} -> ")
    deadline = time.monotonic() + timeout_s
    while True:
        with log_file.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        if match := closing.search(text):
            line = text[text.rfind("\n", 0, match.start()) + 1 : text.find("\n", match.end())]
            erlang_pid = match.group(1)
            mentions = "\n".join(row for row in text.splitlines() if erlang_pid in row)
            return Closing(line, mentions)
        if time.monotonic() > deadline:
            raise AssertionError(f"RabbitMQ logged no close of the connection from port {port}")
        await asyncio.sleep(0.1)
