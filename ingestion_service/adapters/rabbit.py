"""Publishing readings to RabbitMQ: persistent JSON, pipelined publisher confirms.

A publish of N readings becomes one message of schema version 2 per ``max_message_readings``
readings (one message, in the usual case of a gateway batch): the broker's cost is per
message (a confirm, a quorum-log entry, a delivery per consumer), so readings per message
is what lifts the platform above the broker's messages/s. Schema version 1 (one message per
reading) remains a setting for consumers that are not upgraded yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustConnection
from aio_pika.exceptions import AMQPError, DeliveryError, PublishError
from prometheus_client import Counter, Gauge, Histogram

from common.messages import (
    BATCH_SCHEMA_VERSION,
    CONTENT_TYPE,
    SCHEMA_VERSION,
    encode_batch,
    encode_reading,
)
from common.metrics import LATENCY_BUCKETS_S
from common.models import Reading
from common.rabbit import ROUTING_KEY, Topology, connect, declare_topology
from common.request_id import message_headers
from ingestion_service.backpressure import InFlightReadings

log = logging.getLogger(__name__)

PUBLISHED = Counter("ingestion_published_total", "Readings confirmed by RabbitMQ.")
PUBLISHED_MESSAGES = Counter(
    "ingestion_published_messages_total",
    "Broker messages confirmed by RabbitMQ (a message holds one reading in schema 1, a batch "
    "in schema 2).",
)
PUBLISH_FAILURES = Counter(
    "ingestion_publish_failures_total",
    "Publish calls that failed, by reason (busy: refused at once, too many in flight).",
    ["reason"],
)
IN_FLIGHT = Gauge("ingestion_in_flight_readings", "Readings published, waiting for confirms.")
CONFIRM_LATENCY = Histogram(
    "ingestion_confirm_seconds",
    "Time from publishing a batch to the broker's last confirm.",
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "ingestion_publish_batch_size",
    "Readings per publish call.",
    buckets=(1, 2, 5, 10, 50, 100, 250, 500, 1000, 5000),
)
MESSAGE_READINGS = Histogram(
    "ingestion_message_readings",
    "Readings per broker message confirmed.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)


class BrokerUnavailable(Exception):
    """RabbitMQ cannot be reached or lost the connection; the caller may resend."""


class BrokerRefused(Exception):
    """RabbitMQ refused a message (queue full, or no queue bound); nothing was accepted."""


class NoQueueBound(BrokerRefused):
    """RabbitMQ returned a message as unroutable: no queue is bound for the readings."""


class ConfirmTimeout(Exception):
    """RabbitMQ did not confirm in time; the readings may or may not be stored."""


class BrokerBlocked(BrokerUnavailable):
    """RabbitMQ blocks publishing (memory or disk alarm); the caller may resend later."""


class IngestionBusy(Exception):
    """Too many readings wait for confirms; nothing was published: resend after
    ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


BLOCKED_MESSAGE = (
    "RabbitMQ is blocking publishers (a memory or disk alarm on the broker); retry later"
)
# How often a wait for confirms checks whether the broker has blocked the connection.
BLOCK_CHECK_INTERVAL_S = 0.1
# Readings per schema-2 message at most (INGESTION_MAX_MESSAGE_READINGS): what the consumers
# were sized for (billing's prefetch of 200 messages then holds at most 100,000 readings),
# about 73 kB of JSON, 181 kB with the longest ids allowed: far from a size that strains
# the broker, large enough that the broker's cost per message is shared by 500 readings.
DEFAULT_MAX_MESSAGE_READINGS = 500


class RabbitPublisher:
    """Owns one robust connection and a confirming channel; reconnects by itself.

    At most ``max_in_flight_readings`` readings wait for confirms at once (a larger publish
    only while nothing else does); beyond that a publish is refused with ``IngestionBusy``.
    A publish goes out as messages of ``message_schema`` (2: up to ``max_message_readings``
    readings a message; 1: one message per reading), all confirmed before it returns.
    """

    def __init__(
        self,
        url: str,
        topology: Topology,
        confirm_timeout_s: float,
        max_in_flight_readings: int,
        message_schema: int = BATCH_SCHEMA_VERSION,
        max_message_readings: int = DEFAULT_MAX_MESSAGE_READINGS,
    ) -> None:
        self._url = url
        self._topology = topology
        self._confirm_timeout_s = confirm_timeout_s
        self._message_schema = message_schema
        self._max_message_readings = max_message_readings
        self.in_flight = InFlightReadings(max_in_flight_readings, confirm_timeout_s)
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._connecting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect in the background: while the broker is down, publish answers UNAVAILABLE."""
        self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        connection = await connect(self._url)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            declared = await declare_topology(channel, self._topology)
        except BaseException:
            # Refused, or stopped while starting: close what is open, or the robust
            # connection's reconnect loop outlives the publisher.
            await connection.close()
            raise
        self._connection, self._exchange = connection, declared.exchange
        log.info("connected to RabbitMQ", extra={"exchange": self._topology.exchange})

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected.is_set()

    async def accepting(self) -> bool:
        """Connected and not blocked by a broker alarm, so a publish can be confirmed now.

        RabbitMQ announces a block (connection.blocked) only once the connection publishes
        during an alarm; aiormq tracks it in ``ready()``, which returns at once unless the
        connection is down or blocked, so a zero timeout asks without waiting.
        """
        transport = self._connection.transport if self._connection is not None else None
        if transport is None:
            return False
        try:
            async with asyncio.timeout(0):
                await transport.connection.ready()
        except TimeoutError:
            return False
        return True

    async def publish(self, readings: list[Reading]) -> None:
        """Publish all readings, confirms pipelined; return only when every one is confirmed."""
        if not self.connected or self._exchange is None:
            PUBLISH_FAILURES.labels("not_connected").inc()
            raise BrokerUnavailable("RabbitMQ is not reachable; retry shortly")
        if not await self.accepting():
            PUBLISH_FAILURES.labels("blocked").inc()
            raise BrokerBlocked(BLOCKED_MESSAGE)
        count = len(readings)
        # No await between the check and the count: publishes cannot overtake each other.
        if not self.in_flight.take(count):
            PUBLISH_FAILURES.labels("busy").inc()
            retry_after_s = self.in_flight.retry_after_s
            raise IngestionBusy(
                f"ingestion is busy: {self.in_flight.count} readings wait for RabbitMQ's "
                f"confirms (at most {self.in_flight.limit}); nothing of these {count} was "
                f"published, resend in {retry_after_s:.2f} s",
                retry_after_s,
            )
        IN_FLIGHT.inc(count)
        try:
            await self._publish_confirmed(self._exchange, readings)
        finally:
            self.in_flight.release(count)
            IN_FLIGHT.dec(count)

    def _chunks(self, readings: list[Reading]) -> list[list[Reading]]:
        """The readings of each message: up to ``max_message_readings`` in schema 2, one in
        schema 1."""
        size = 1 if self._message_schema == SCHEMA_VERSION else self._max_message_readings
        return [readings[start : start + size] for start in range(0, len(readings), size)]

    async def _publish_confirmed(self, exchange: AbstractExchange, readings: list[Reading]) -> None:
        # Only the request id travels as a header (the schema version is in the body): a
        # header table has a cost per message (pamqp encodes it each time; a larger table
        # once cost 6% of ingestion's CPU), so without an id there is no table at all.
        headers = message_headers()
        chunks = self._chunks(readings)
        make = _reading_message if self._message_schema == SCHEMA_VERSION else _batch_message
        messages = [make(chunk, headers) for chunk in chunks]
        started = time.perf_counter()
        try:
            await self._confirmed(
                asyncio.gather(
                    *(exchange.publish(m, ROUTING_KEY, mandatory=True) for m in messages)
                )
            )
        except BrokerBlocked:
            PUBLISH_FAILURES.labels("blocked").inc()
            raise
        except TimeoutError:
            PUBLISH_FAILURES.labels("confirm_timeout").inc()
            if not self.connected:
                raise BrokerUnavailable("lost the connection to RabbitMQ; resend") from None
            raise ConfirmTimeout(
                f"RabbitMQ did not confirm within {self._confirm_timeout_s} s; resend"
            ) from None
        except PublishError as error:  # returned: no queue bound to the routing key
            PUBLISH_FAILURES.labels("unroutable").inc()
            raise NoQueueBound(f"no queue is bound for the readings: {error}") from None
        except DeliveryError as error:  # nacked: queue full or broker alarm
            PUBLISH_FAILURES.labels("nacked").inc()
            raise BrokerRefused(f"RabbitMQ refused the readings: {error}") from None
        except (AMQPError, aiormq.exceptions.AMQPError, OSError, RuntimeError) as error:
            PUBLISH_FAILURES.labels("connection").inc()
            raise BrokerUnavailable(f"RabbitMQ connection failed: {error!r}; resend") from None
        latency_s = time.perf_counter() - started
        self.in_flight.confirmed_after(latency_s)
        CONFIRM_LATENCY.observe(latency_s)
        BATCH_SIZE.observe(len(readings))
        PUBLISHED.inc(len(readings))
        PUBLISHED_MESSAGES.inc(len(messages))
        for chunk in chunks:
            MESSAGE_READINGS.observe(len(chunk))

    async def _confirmed(self, confirms: asyncio.Future[object]) -> None:
        """Wait for the confirms, but stop early once the broker blocks the connection.

        A blocked connection would otherwise hold the caller until the confirm timeout; the
        messages already written may still be stored when the alarm clears, which is why
        the caller is told to resend (readings are deduplicated by reading_id).
        """
        deadline = asyncio.get_running_loop().time() + self._confirm_timeout_s
        try:
            while True:
                try:
                    async with asyncio.timeout(BLOCK_CHECK_INTERVAL_S):
                        await asyncio.shield(confirms)
                    return
                except TimeoutError:
                    if self.connected and not await self.accepting():
                        raise BrokerBlocked(
                            f"{BLOCKED_MESSAGE}; these readings may be stored when it clears, "
                            "resend them (they are deduplicated by reading_id)"
                        ) from None
                    if asyncio.get_running_loop().time() >= deadline:
                        raise
        finally:
            if not confirms.done():
                confirms.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await confirms

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting  # its clean-up runs before the close returns
        if self._connection is not None:
            await self._connection.close()


def _persistent(body: bytes, message_id: str, headers: dict[str, str] | None) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        headers=headers,
    )


def _reading_message(
    readings: Sequence[Reading], headers: dict[str, str] | None
) -> aio_pika.Message:
    """Schema 1: one reading, its reading id the message id."""
    [reading] = readings
    return _persistent(encode_reading(reading), reading.reading_id, headers)


def _batch_message(readings: Sequence[Reading], headers: dict[str, str] | None) -> aio_pika.Message:
    """Schema 2: a batch under a new batch id, which is also the message id."""
    batch_id = uuid.uuid4().hex
    return _persistent(encode_batch(readings, batch_id), batch_id, headers)
