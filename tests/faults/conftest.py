"""The fault tests' fixtures: stacks of the four services with a seeded tariff catalog, and
private servers (a RabbitMQ node, a MongoDB server) that a test may crash."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from billing_service.adapters.mongo import MongoCatalog
from tests.e2e.conftest import Stack
from tests.faults.load import fault_catalog, load_devices, stream_devices
from tests.mongo_server import LocalMongo
from tests.rabbit_node import RabbitNode

# The devices the catalog registers: the steady load's and the long streams'.
STREAM_PREFIXES = ("stream-i", "stream-g")


def stack_prefix() -> str:
    """A fresh prefix for a fault stack's queues, database and keys."""
    return f"f{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """The tariff catalog every fault stack bills with (flat, time-of-use, tiered)."""
    path = tmp_path / "catalog.yaml"
    devices = load_devices() + [d for p in STREAM_PREFIXES for d in stream_devices(p)]
    path.write_text(fault_catalog(devices))
    return path


@pytest.fixture
async def stacks(tmp_path: Path, catalog: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Start a stack of the test's own, its catalog seeded; stop and clean it afterwards.

    ``rabbitmq_url`` and ``mongodb_url`` point it at private servers; ``prefix`` names its
    queues, database and keys (a fresh one by default: see :func:`stack_prefix`);
    ``extra_env`` overrides settings. A test that uses private servers asks for their
    fixtures before this one, so that they outlive the stack's clean-up.
    """
    started: list[Stack] = []
    catalog_text = catalog.read_text()  # noqa: ASYNC240 - a small file, once per test

    async def make(
        rabbitmq_url: str | None = None,
        mongodb_url: str | None = None,
        prefix: str | None = None,
        **extra_env: str,
    ) -> Stack:
        stack = Stack(prefix=prefix or stack_prefix(), log_dir=tmp_path, extra_env=extra_env)
        stack.rabbitmq_url = rabbitmq_url or stack.rabbitmq_url
        stack.mongodb_url = mongodb_url or stack.mongodb_url
        ledger = stack.ledger()
        try:
            await MongoCatalog(ledger.database).save(catalog_text, str(catalog))
        finally:
            ledger.close()
        started.append(stack)
        await stack.start()
        return stack

    yield make
    for stack in started:
        await stack.stop()
        await stack.clean()


@pytest.fixture
async def rabbit_node(tmp_path: Path) -> AsyncIterator[RabbitNode]:
    """A RabbitMQ node of the test's own, to SIGKILL without touching the shared one."""
    node = RabbitNode(tmp_path / "rabbitmq")
    try:
        await node.start()
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def mongo_server(tmp_path: Path) -> AsyncIterator[LocalMongo]:
    """A MongoDB-wire server of the test's own, to stop under load and start again."""
    server = LocalMongo(tmp_path / "mongodb")
    try:
        await server.start()
        yield server
    finally:
        if server.running:
            await server.stop()
