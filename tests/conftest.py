"""Where the real servers are (make services starts them) and per-test isolation.

Point the tests at your own servers with RABBITMQ_URL, RABBITMQ_MANAGEMENT_URL,
REDIS_URL and MONGODB_URL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TypeVar

import pytest

from billing_service.domain.ledger import SlotKey, Total
from common.models import Reading

# Every gateway a test starts, in this process or as a child, serves HTTP on a free port of
# its own (0), never on 8080, where make dev's gateway or another run's may listen.
os.environ.setdefault("GATEWAY_HTTP_PORT", "0")

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBITMQ_MANAGEMENT_URL = os.environ.get("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MONGODB_URL = os.environ.get("MONGODB_URL", "mongodb://127.0.0.1:27017/")


# The gateway's admin credential in every test stack: it may send and read for any device.
ADMIN_TOKEN = "test-admin-token-not-secret-0123456789"
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
# A small catalog for tests of bills: one flat EUR tariff, account acme with two meters.
ACME_CATALOG = """
default_tariff: flat-eur
tariffs:
  - id: flat-eur
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: "0.45"
    tax_rate: "0.19"
    energy: {kind: flat, price_per_kwh: "0.30"}
accounts:
  - {id: acme, name: ACME}
devices:
  - {id: meter-1, account: acme, site: plant, tariff: flat-eur}
  - {id: meter-2, account: acme, site: office, tariff: flat-eur}
"""


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """For tests that call configure_logging: the root logger as it was, afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def prefix() -> str:
    """A unique prefix for queue names, Redis keys and database names of one test."""
    return f"t{uuid.uuid4().hex[:10]}-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30, what: str = "condition"
) -> None:
    """Poll an async predicate until it holds; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.1)


T = TypeVar("T")


async def wait_while_progressing(
    measure: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    stall_s: float = 300,
) -> T:
    """Poll ``measure`` until ``done`` holds for its value; return that value.

    For waits whose length the machine sets (billing drains at its MongoDB server's pace):
    no deadline on the whole wait, only on a stall, so a slow machine passes and a stuck
    stack fails once ``measure`` has not changed for ``stall_s``.
    """
    value, changed_at = await measure(), time.monotonic()
    while not done(value):
        await asyncio.sleep(0.2)
        latest = await measure()
        if latest != value:
            value, changed_at = latest, time.monotonic()
        elif time.monotonic() - changed_at > stall_s:
            raise AssertionError(
                f"no progress for {stall_s} s waiting for {what}; last seen {value!r}"
            )
    return value


def expected_totals(readings: Iterable[Reading]) -> dict[SlotKey, Total]:
    """What billing must hold: each distinct reading id counted once in its slot.

    Worked out here, not with billing's code: the slot is found by integer arithmetic on
    microseconds since the epoch, the energy from the decimal text of the kWh.
    """
    totals: dict[SlotKey, Total] = {}
    for r in {r.reading_id: r for r in readings}.values():
        key = SlotKey(r.device_id, _slot_holding(r.timestamp))
        milliwh = int((Decimal(repr(r.usage_kwh)) * 1_000_000).to_integral_value(ROUND_HALF_EVEN))
        totals[key] = totals.get(key, Total()) + Total(1, milliwh)
    return totals


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SLOT_US = 15 * 60 * 1_000_000


def _slot_holding(timestamp: datetime) -> datetime:
    """Start of the 15-minute UTC slot (start, start + 15 min] that holds ``timestamp``:
    energy of the interval ending at 07:00:00 belongs to 06:45."""
    micros = (timestamp.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return _EPOCH + timedelta(microseconds=(micros - 1) // _SLOT_US * _SLOT_US)


async def delete_topology(prefix: str) -> None:
    """Remove the exchanges and queues a test declared under its prefix."""
    import aio_pika

    from common.rabbit import Topology, delete_topology

    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        await delete_topology(await connection.channel(), Topology(prefix))


async def queue_info(name: str) -> dict:
    """The management API's view of a queue (type, ready and unacked counts)."""
    import httpx

    async with httpx.AsyncClient(auth=("guest", "guest"), timeout=5) as client:
        response = await client.get(f"{RABBITMQ_MANAGEMENT_URL}/api/queues/%2F/{name}")
        response.raise_for_status()
        return response.json()


async def ready_count(queue_name: str) -> int:
    """Messages ready in a queue, as the broker counts them now (no statistics delay)."""
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return int(queue.declaration_result.message_count or 0)


async def queue_counts(queue_name: str) -> tuple[int, int]:
    """``(ready, unacked)``: messages of a queue waiting, and delivered but not yet acked.

    From the management API, whose statistics refresh every few seconds (RabbitMQ's
    ``collect_statistics_interval``, 5 s by default): the figures lag. Use them to wait for
    a state that lasts (``wait_for_unacked``), not as a sample of this instant; for the
    ready count now, ``ready_count`` asks the broker directly.
    """
    info = await queue_info(queue_name)
    return int(info.get("messages_ready", 0)), int(info.get("messages_unacknowledged", 0))


async def wait_for_unacked(queue_name: str, timeout_s: float = 30) -> int:
    """Wait until a consumer holds deliveries of the queue unacked; return how many.

    The broker's view that work is in flight, for tests that must act while it is (a
    SIGTERM, a broker restart). The state must last until it shows (see ``queue_counts``).
    """
    unacked = 0

    async def held() -> bool:
        nonlocal unacked
        _, unacked = await queue_counts(queue_name)
        return unacked > 0

    await wait_until(held, timeout_s, what=f"unacked deliveries on {queue_name}")
    return unacked


async def ready_once_unconsumed(queue_name: str, timeout_s: float = 30) -> int:
    """Messages ready in a queue once no consumer is left on it: the count after a consumer
    stopped, with whatever it left unacked back in the queue.

    Right after a consumer's channel closes, a quorum queue may not have taken back its
    unacked deliveries yet (an immediate ``ready_count`` can read 0). It counts a departed
    consumer until it has, so once the consumer count is 0 the ready count is final.
    """
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        ready = 0

        async def unconsumed() -> bool:
            nonlocal ready
            queue = await channel.declare_queue(queue_name, passive=True)
            ready = int(queue.declaration_result.message_count or 0)
            return queue.declaration_result.consumer_count == 0

        await wait_until(unconsumed, timeout_s, what=f"no consumer left on {queue_name}")
        return ready
