"""Consuming readings from a queue, with the acknowledgement policy decided in one place.

- handled: ack, after the handler returned (for billing: after MongoDB acknowledged);
- ``PoisonMessage`` (unparseable or invalid): published to the dead-letter exchange with
  the reason in the ``x-rejection-reason`` header, confirmed, then acked;
- anything else unexpected: logged once and requeued; the quorum queue's delivery limit
  moves a message that keeps failing to the dead-letter queue instead of looping.

Transient failures (a database down) are the handler's to retry: a requeue would count
towards the delivery limit and could dead-letter a good reading.

Stopping (SIGTERM) cancels the consumer first, lets the handlers already running finish
and ack within the grace period, and leaves the rest unacked (cancelled, or delivered
after the stop began): closing the channel hands them back to the broker for redelivery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from prometheus_client import Counter, Histogram

from common.messages import PoisonMessage, decode_reading
from common.metrics import LATENCY_BUCKETS_S
from common.models import Limits, Reading
from common.rabbit import (
    REASON_HEADER,
    ROUTING_KEY,
    Topology,
    connect,
    declare_topology,
    persistent_copy,
)

log = logging.getLogger(__name__)

# Cap on each broker call made while stopping (cancel, channel and connection close).
STOP_CALL_TIMEOUT_S = 5.0
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800)
MESSAGES = Counter(
    "consumer_messages_total",
    "Messages consumed, by consumer and outcome (acked, dead_lettered, requeued).",
    ["consumer", "outcome"],
)
PROCESSING = Histogram(
    "consumer_processing_seconds",
    "Time from delivery to acknowledgement.",
    ["consumer"],
    buckets=LATENCY_BUCKETS_S,
)
READING_LAG = Histogram(
    "consumer_reading_lag_seconds",
    "Time from a reading's timestamp to its processing.",
    ["consumer"],
    buckets=LAG_BUCKETS_S,
)

Handler = Callable[[Reading], Awaitable[None]]


class ReadingConsumer:
    """Consumes one queue with manual acks and a prefetch window; handlers run concurrently."""

    def __init__(
        self,
        name: str,
        url: str,
        topology: Topology,
        queue_name: str,
        handler: Handler,
        prefetch: int,
        limits: Limits,
    ) -> None:
        self._name = name
        self._url = url
        self._topology = topology
        self._queue_name = queue_name
        self._handler = handler
        self._prefetch = prefetch
        self._limits = limits
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        self._connection = await connect(self._url)
        channel = self._channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self._prefetch)
        declared = await declare_topology(channel, self._topology)
        self._dead_letter_exchange = declared.dead_letter_exchange
        self._queue = declared.queues[self._queue_name]
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info("consuming", extra={"queue": self._queue_name, "prefetch": self._prefetch})

    async def stop(self, grace_s: float) -> None:
        """Stop taking deliveries, let in-flight ones finish for ``grace_s``, then close.

        Anything not acked by then is redelivered by the broker: never lost, and billing's
        idempotency makes the redelivery harmless.
        """
        self._stopping = True
        deadline = asyncio.get_running_loop().time() + grace_s
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag, timeout=STOP_CALL_TIMEOUT_S)
            except Exception:  # the channel may already be gone; closing below is enough
                log.warning("could not cancel consumer", exc_info=True)
        in_flight, unfinished = len(self._in_flight), set[asyncio.Task[None]]()
        if self._in_flight:
            remaining_s = max(0.0, deadline - asyncio.get_running_loop().time())
            _, unfinished = await asyncio.wait(set(self._in_flight), timeout=remaining_s)
            for task in unfinished:  # not acked: the broker redelivers them
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        for closeable in (self._channel, self._connection):
            if closeable is not None and not closeable.is_closed:
                try:
                    async with asyncio.timeout(STOP_CALL_TIMEOUT_S):
                        await closeable.close()
                except Exception:  # unacked deliveries are requeued however the link ends
                    log.warning("could not close cleanly", exc_info=True)
        log.info(
            "consumer stopped",
            extra={
                "queue": self._queue_name,
                "in_flight": in_flight,
                "finished": in_flight - len(unfinished),
                "left_unacked": len(unfinished),
            },
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:  # delivered while cancelling: left unacked, redelivered later
            return
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)  # type: ignore[arg-type]
            task.add_done_callback(self._in_flight.discard)
        started = time.perf_counter()
        try:
            reading = decode_reading(message.body, now=datetime.now(UTC), limits=self._limits)
            await self._handler(reading)
        except PoisonMessage as error:
            outcome = await self._dead_letter(message, str(error))
        except Exception:
            log.exception(
                "unexpected failure handling a message; requeueing it",
                extra={"message_id": message.message_id, "queue": self._queue_name},
            )
            await _requeue(message)
            outcome = "requeued"
        else:
            await message.ack()
            READING_LAG.labels(self._name).observe(
                (datetime.now(UTC) - reading.timestamp).total_seconds()
            )
            outcome = "acked"
        MESSAGES.labels(self._name, outcome).inc()
        PROCESSING.labels(self._name).observe(time.perf_counter() - started)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> str:
        """Publish to the dead-letter exchange with the reason, confirmed, then ack."""
        assert self._dead_letter_exchange is not None
        log.warning(
            "dead-lettering a poison message",
            extra={"message_id": message.message_id, "reason": reason, "queue": self._queue_name},
        )
        headers = dict(message.headers or {})
        headers.update({REASON_HEADER: reason, "x-original-queue": self._queue_name})
        try:
            await self._dead_letter_exchange.publish(
                persistent_copy(message, headers), routing_key=message.routing_key or ROUTING_KEY
            )
        except Exception:
            log.exception("could not dead-letter; requeueing", extra={"reason": reason})
            await _requeue(message)
            return "requeued"
        await message.ack()
        return "dead_lettered"


async def _requeue(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception:  # channel gone: the broker redelivers unacked messages anyway
        log.warning("could not requeue; the broker will redeliver", exc_info=True)
