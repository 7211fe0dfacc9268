"""When RabbitMQ refuses or blocks publishing, SendReading never answers OK.

A full queue (a max-length policy, as an operator would set one) is refused with
RESOURCE_EXHAUSTED; a memory or disk alarm blocks every publishing connection and is
answered UNAVAILABLE. Alarms are raised on a RabbitMQ node of this module's own, so the
shared broker other tests use is never blocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from common.energy.v1 import gateway_pb2_grpc
from common.gateway_client import gateway_channel
from common.rabbit import Topology
from tests.component.test_ingestion import drain_reading_ids, request, start_pipeline
from tests.conftest import (
    ADMIN_TOKEN,
    RABBITMQ_MANAGEMENT_URL,
    delete_topology,
    free_port,
    wait_until,
)


@dataclass
class Pipeline:
    stub: gateway_pb2_grpc.GatewayStub
    ingestion: object


@pytest.fixture
async def full_after_five(prefix: str) -> AsyncIterator[str]:
    """A policy limiting the test's billing queue to five messages (overflow reject-publish)."""
    name = f"{prefix}max-length"
    url = f"{RABBITMQ_MANAGEMENT_URL}/api/policies/%2F/{name}"
    policy = {
        "pattern": f"^{Topology(prefix).billing_queue}$",
        "definition": {"max-length": 5},
        "apply-to": "queues",
        "priority": 10,
    }
    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=10) as client:
        (await client.put(url, json=policy)).raise_for_status()
        yield prefix
        (await client.delete(url)).raise_for_status()


async def pipeline_on(prefix: str, rabbitmq_url: str | None = None):  # type: ignore[no-untyped-def]
    kwargs = {"rabbitmq_url": rabbitmq_url} if rabbitmq_url else {}
    ingestion, gateway = await start_pipeline(prefix, **kwargs)
    await ingestion.publisher._connecting
    channel = gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    return ingestion, gateway, channel, gateway_pb2_grpc.GatewayStub(channel)


async def test_a_full_queue_is_resource_exhausted_and_only_ok_readings_are_queued(
    full_after_five: str,
) -> None:
    prefix = full_after_five
    ingestion, gateway, channel, stub = await pipeline_on(prefix)
    try:
        accepted, refused = [], []
        for minute in range(12):
            try:
                response = await stub.SendReading(request(minutes=minute), timeout=10)
                accepted.append(response.reading_id)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
                assert "refused" in (error.details() or "")
                refused.append(minute)
        # A quorum queue starts refusing once it is over its limit, so one more gets in.
        assert len(accepted) in (5, 6) and refused == list(range(len(accepted), 12))
        queued = await drain_reading_ids(Topology(prefix).billing_queue)
        assert sorted(queued) == sorted(accepted)
    finally:
        await channel.close()
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


class OwnRabbitNode:
    """A throwaway RabbitMQ node (no plugins) on free ports, for alarms nobody else sees."""

    def __init__(self) -> None:
        self.port = free_port()
        self.name = f"alarms-{os.getpid()}-{self.port}@localhost"
        self.home = Path(tempfile.mkdtemp(prefix="rabbit-alarms-"))
        (self.home / "enabled_plugins").write_text("[].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.home / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.home / "pid"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        if os.geteuid() == 0:  # the Debian wrapper runs the node as the rabbitmq user
            shutil.chown(self.home, "rabbitmq", "rabbitmq")
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, check=True)
        deadline = time.monotonic() + 90
        while self.ctl("await_startup", "--timeout", "60", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.name} did not start; see {self.home}")
            time.sleep(0.5)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
        )

    def alarms(self) -> list[str]:
        status = json.loads(self.ctl("status", "--formatter", "json").stdout)
        return [str(alarm) for alarm in status.get("alarms", [])]

    def stop(self) -> None:
        self.ctl("stop", check=False)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def own_node() -> Iterator[OwnRabbitNode]:
    node = OwnRabbitNode()
    node.start()
    yield node
    node.stop()


ALARMS = {
    "memory": (
        ("set_vm_memory_high_watermark", "absolute", "1"),
        ("set_vm_memory_high_watermark", "0.4"),
    ),
    "disk": (("set_disk_free_limit", "1000000GB"), ("set_disk_free_limit", "50MB")),
}


@pytest.mark.parametrize("alarm", sorted(ALARMS))
async def test_a_broker_alarm_is_unavailable_at_once_and_publishing_resumes_after_it(
    own_node: OwnRabbitNode, prefix: str, alarm: str
) -> None:
    raise_alarm, clear_alarm = ALARMS[alarm]
    ingestion, gateway, channel, stub = await pipeline_on(prefix, own_node.url)
    accepted, refused = [], []

    async def send(minute: int) -> None:
        try:
            accepted.append(
                (await stub.SendReading(request(minutes=minute), timeout=10)).reading_id
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
            assert "alarm" in (error.details() or "")
            refused.append(minute)

    try:
        await send(0)
        own_node.ctl(*raise_alarm)
        await wait_until(_raised(own_node), what=f"the {alarm} alarm")
        # Each refusal says "alarm" (checked in send): the block was detected, not waited
        # out, for a confirm timeout is answered "did not confirm within 3 s" instead.
        for minute in range(1, 6):
            await send(minute)
        assert refused == [1, 2, 3, 4, 5] and len(accepted) == 1
        own_node.ctl(*clear_alarm)
        await wait_until(_cleared(own_node), what=f"the {alarm} alarm to clear")

        async def resumed() -> bool:
            await send(6 + len(refused))
            return len(accepted) > 1

        await wait_until(resumed, timeout_s=30, what="publishing to resume")
        queued = set(await drain_reading_ids(Topology(prefix).billing_queue, own_node.url))
        # Every OK reading is queued; a refused one may be too (written before the block
        # was announced), which is why the caller resends and billing deduplicates.
        assert set(accepted) <= queued
    finally:
        await channel.close()
        await gateway.stop()
        await ingestion.stop()


def _raised(node: OwnRabbitNode):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return bool(node.alarms())

    return check


def _cleared(node: OwnRabbitNode):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return not node.alarms()

    return check
