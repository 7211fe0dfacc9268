"""The broker topology, declared the same way by the publisher and every consumer.

Declaring is idempotent, so whichever service starts first creates it. Queues are quorum
queues (replicated, durable) with at-least-once dead-lettering: a message a consumer
rejects, or that is redelivered more than ``DELIVERY_LIMIT`` times, moves to the
dead-letter queue instead of looping or vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import AMQPError

from common.retry import WAIT_FOR_DEPENDENCY, retrying

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 20
ROUTING_KEY = "reading.v1"
REASON_HEADER = "x-rejection-reason"


@dataclass(frozen=True)
class Topology:
    """Exchange and queue names; ``prefix`` isolates tests that share one broker."""

    prefix: str = ""

    @property
    def exchange(self) -> str:
        return f"{self.prefix}energy.readings"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}energy.dead-letter"

    @property
    def billing_queue(self) -> str:
        return f"{self.prefix}billing.readings"

    @property
    def analytics_queue(self) -> str:
        return f"{self.prefix}analytics.readings"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.prefix}energy.dead-letter"


def persistent_copy(
    message: aio_pika.abc.AbstractIncomingMessage, headers: dict[str, Any]
) -> aio_pika.Message:
    """A received message to publish again (dead-lettering, replay): same body and id."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.message_id,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


@dataclass(frozen=True)
class DeclaredTopology:
    exchange: AbstractExchange
    dead_letter_exchange: AbstractExchange
    queues: dict[str, AbstractQueue]


def reading_queue_arguments(topology: Topology) -> dict[str, Any]:
    """The arguments of billing.readings and analytics.readings (also the bench's queues)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": topology.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


async def declare_topology(channel: AbstractChannel, topology: Topology) -> DeclaredTopology:
    """Declare exchanges, queues and bindings; safe to call from every service at start."""
    exchange = await channel.declare_exchange(
        topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_letter_exchange = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead_letter_queue = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_letter_queue.bind(dead_letter_exchange, routing_key="#")
    queues = {topology.dead_letter_queue: dead_letter_queue}
    for name in (topology.billing_queue, topology.analytics_queue):
        queue = await channel.declare_queue(
            name, durable=True, arguments=reading_queue_arguments(topology)
        )
        await queue.bind(exchange, routing_key="reading.#")
        queues[name] = queue
    return DeclaredTopology(exchange, dead_letter_exchange, queues)


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Delete what ``declare_topology`` made, messages and all (for tests and benches)."""
    for queue in (topology.billing_queue, topology.analytics_queue, topology.dead_letter_queue):
        await channel.queue_delete(queue)
    for exchange in (topology.exchange, topology.dead_letter_exchange):
        await channel.exchange_delete(exchange)


async def connect(url: str) -> AbstractRobustConnection:
    """A robust connection (it reconnects by itself), retried with backoff until it is up:
    a service waits at start for the broker it cannot work without."""
    return await retrying(
        lambda: _connect_once(url),
        operation="rabbitmq_connect",
        policy=WAIT_FOR_DEPENDENCY,
        retry_on=(OSError, AMQPError, asyncio.TimeoutError),
    )


async def _connect_once(url: str) -> AbstractRobustConnection:
    """``aio_pika.connect_robust``, closing the connection of an attempt that fails or is
    cancelled (a service stopped while it starts): connect_robust drops it unclosed, and its
    reconnect loop then runs on with no owner, every 5 s, until the process ends."""
    connection = aio_pika.RobustConnection(make_url(url))
    try:
        await connection.connect(timeout=5)
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    return connection
