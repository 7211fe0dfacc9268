"""Consuming readings from a queue in batches, with the acknowledgement policy decided in one place.

A delivery carries one reading (schema version 1) or many (version 2, ``common.messages``).
Deliveries are gathered into batches by the readings they carry: up to ``batch_size``
readings, or whatever has arrived ``batch_linger_s`` after the first, whichever comes
first. A delivery is never split (one carrying more than ``batch_size`` is a batch alone),
and only the batch being gathered is decoded: memory holds the prefetch window's bodies
and one batch of readings, whatever the messages' sizes.

Batches are handled one at a time, in delivery order, and every delivery ends in one
outcome, which one table (``_settle``) turns into broker actions:
- ``DeadLetter(reason)``, a message that cannot be read at all (not JSON, unknown schema
  version, an invalid version-1 reading): published to the dead-letter exchange with the
  reason in the ``x-rejection-reason`` header, confirmed, then acked, one by one, before
  the batch's good readings are handled, so they do not hold them back;
- ``Ack``: the delivery's valid readings were handled with the batch (for billing: MongoDB
  holds them) and each of its invalid elements is in the dead-letter queue alone, as the
  version-1 message it would have been, with its reason (``_dead_letter_invalid``). One
  ``ack(multiple=True)`` on the last delivery acks them all. That is exact because every
  earlier delivery on the channel is settled by then: the batches before were settled in
  full, and this batch's other outcomes are settled first;
- ``Requeue``: anything else unexpected. It is logged once, the batch is handled again one
  delivery at a time, and only the deliveries that fail again are requeued; the quorum
  queue's delivery limit moves one that keeps failing to the dead-letter queue instead of
  looping.

Transient failures (a database down) are the handler's to wait out (``common.retry``): a
requeue would count towards the delivery limit and could dead-letter a good reading.

Stopping (SIGTERM) cancels the consumer first, lets the deliveries already received be
handled and acked within the grace period, and leaves the rest unacked (not handled by
then, or delivered after the stop began): closing the channel hands them back to the
broker for redelivery.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from prometheus_client import Counter, Gauge, Histogram

from common.messages import CONTENT_TYPE, InvalidElement, PoisonMessage, decode
from common.metrics import LATENCY_BUCKETS_S, observe_times
from common.models import Limits, Reading
from common.rabbit import (
    REASON_HEADER,
    ROUTING_KEY,
    Topology,
    connect,
    declare_topology,
    persistent_copy,
)
from common.request_id import LOG_FIELD, bound, from_message_headers

log = logging.getLogger(__name__)

# Headers of a dead letter besides the reason: the queue it was consumed from, and for an
# element of a batch, the message id of the batch it came from.
ORIGINAL_QUEUE_HEADER = "x-original-queue"
BATCH_ID_HEADER = "x-batch-id"
# Cap on each broker call made while stopping (cancel, channel and connection close).
STOP_CALL_TIMEOUT_S = 5.0
LAG_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400, 604800)
MESSAGES = Counter(
    "consumer_messages_total",
    "Messages consumed, by consumer and outcome (acked, dead_lettered, requeued).",
    ["consumer", "outcome"],
)
READINGS = Counter(
    "consumer_readings_total",
    "Readings consumed, by consumer and outcome: acked (handled), dead_lettered (an invalid "
    "element alone, or a message that cannot be read at all, which counts as one), requeued.",
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
UNSETTLED = Gauge(
    "consumer_unsettled_messages",
    "Deliveries received and not yet settled: the work in flight that a crash would return "
    "to the queue.",
    ["consumer"],
)
REDELIVERED = Counter(
    "consumer_redelivered_total",
    "Deliveries the broker marked as redelivered (a consumer before this one held them "
    "unsettled when it stopped or died).",
    ["consumer"],
)
BATCH_SIZE = Histogram(
    "consumer_batch_size",
    "Readings per batch handled (a message without any counts as one).",
    ["consumer"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
OUTCOMES = ("acked", "dead_lettered", "requeued")

# Handles a batch of valid readings; returns once they may be acked, raises if they may not.
BatchHandler = Callable[[Sequence[Reading]], Awaitable[None]]


@dataclass(frozen=True)
class Ack:
    """Handled (its invalid elements dead-lettered alone): acknowledge."""


@dataclass(frozen=True)
class DeadLetter:
    """Cannot be read at all: to the dead-letter queue with ``reason``, then acknowledge."""

    reason: str


@dataclass(frozen=True)
class Requeue:
    """Failed unexpectedly: back to the queue (its delivery limit ends a loop)."""


Outcome = Ack | DeadLetter | Requeue


@dataclass(eq=False)
class _Delivery:
    message: AbstractIncomingMessage
    received: float  # time.monotonic()
    settled: bool = False
    # Set by ``decode``, once the delivery is gathered into a batch:
    decoded: bool = False
    readings: list[Reading] = field(default_factory=list)
    invalid: list[InvalidElement] = field(default_factory=list)  # to dead-letter alone
    unreadable: str | None = None  # why the whole message is poison, if it is

    def decode(self, limits: Limits) -> None:
        if self.decoded:
            return
        self.decoded = True
        try:
            decoded = decode(self.message.body, now=datetime.now(UTC), limits=limits)
        except PoisonMessage as error:
            self.unreadable = str(error)
        except Exception as error:
            # A body the decoder chokes on (a bug) chokes it on every redelivery too:
            # dead-letter it now instead of looping to the delivery limit.
            log.exception("unexpected failure decoding a message; dead-lettering it")
            self.unreadable = f"could not be decoded: {error!r}"
        else:
            self.readings, self.invalid = decoded.readings, decoded.invalid

    @property
    def count(self) -> int:
        """Readings it carries, valid or not; a message that cannot be read counts as one."""
        return 1 if self.unreadable is not None else len(self.readings) + len(self.invalid)

    @property
    def weight(self) -> int:
        """What it counts for in a batch's size: an empty batch message still costs an ack."""
        return max(1, self.count)


class ReadingConsumer:
    """Consumes one queue with manual acks and a prefetch window, a batch at a time.

    ``prefetch`` counts messages (the broker's unit) and ``batch_size`` readings: a message
    holds one reading or a batch of them. ``handler`` handles the valid readings of a batch
    together; after an unexpected failure it is called again with one delivery's at a time.
    """

    def __init__(
        self,
        name: str,
        url: str,
        topology: Topology,
        queue_name: str,
        handler: BatchHandler,
        prefetch: int,
        limits: Limits,
        *,
        batch_size: int,
        batch_linger_s: float = 0.0,
    ) -> None:
        self._name = name
        self._url = url
        self._topology = topology
        self._queue_name = queue_name
        self._handler = handler
        self._prefetch = prefetch
        self._batch_size = max(1, batch_size)
        self._batch_linger_s = batch_linger_s
        self._limits = limits
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._dead_letter_exchange: AbstractExchange | None = None
        self._consumer_tag: str | None = None
        self._received: deque[_Delivery] = deque()
        self._arrived = asyncio.Event()
        self._unsettled = 0
        self._batches: asyncio.Task[None] | None = None
        self._stopping = False
        self._messages = {outcome: MESSAGES.labels(name, outcome) for outcome in OUTCOMES}
        self._readings = {outcome: READINGS.labels(name, outcome) for outcome in OUTCOMES}
        self._processing = PROCESSING.labels(name)
        self._lag = READING_LAG.labels(name)
        self._batch_sizes = BATCH_SIZE.labels(name)
        self._in_flight = UNSETTLED.labels(name)
        self._redelivered = REDELIVERED.labels(name)

    async def start(self) -> None:
        self._connection = await connect(self._url)
        channel = self._channel = await self._connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self._prefetch)
        declared = await declare_topology(channel, self._topology)
        self._dead_letter_exchange = declared.dead_letter_exchange
        self._queue = declared.queues[self._queue_name]
        self._batches = asyncio.create_task(self._handle_batches())
        self._consumer_tag = await self._queue.consume(self._on_message)
        log.info(
            "consuming",
            extra={
                "queue": self._queue_name,
                "prefetch": self._prefetch,
                "batch_size": self._batch_size,
                "batch_linger_s": self._batch_linger_s,
            },
        )

    async def stop(self, grace_s: float) -> None:
        """Stop taking deliveries, handle those received for ``grace_s``, then close.

        Anything not acked by then is redelivered by the broker: never lost, and billing's
        idempotency makes the redelivery harmless.
        """
        self._stopping = True
        self._arrived.set()  # no lingering for more: handle what is here
        deadline = asyncio.get_running_loop().time() + grace_s
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag, timeout=STOP_CALL_TIMEOUT_S)
            except Exception:  # the channel may already be gone; closing below is enough
                log.warning("could not cancel consumer", exc_info=True)
        in_flight = self._unsettled
        if self._batches is not None:
            remaining_s = max(0.0, deadline - asyncio.get_running_loop().time())
            _, unfinished = await asyncio.wait({self._batches}, timeout=remaining_s)
            for task in unfinished:  # not acked: the broker redelivers them
                task.cancel()
            await asyncio.gather(self._batches, return_exceptions=True)
        left_unacked = self._unsettled
        self._in_flight.dec(left_unacked)  # the broker takes them back with the channel
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
                "finished": in_flight - left_unacked,
                "left_unacked": left_unacked,
            },
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:  # delivered while cancelling: left unacked, redelivered later
            return
        self._received.append(_Delivery(message, time.monotonic()))
        self._unsettled += 1
        self._in_flight.inc()
        if message.redelivered:
            self._redelivered.inc()
        self._arrived.set()

    async def _handle_batches(self) -> None:
        """Forever (until stopped and drained): take a batch, handle it, settle it."""
        while (batch := await self._next_batch()) is not None:
            try:
                await self._handle(batch)
            except Exception:  # a bug here must not stop consuming; the broker redelivers
                log.exception(
                    "unexpected failure settling a batch; requeueing what is unsettled",
                    extra={"queue": self._queue_name, "batch": len(batch)},
                )
                await self._requeue([d for d in batch if not d.settled])

    async def _next_batch(self) -> list[_Delivery] | None:
        """The next deliveries in order, up to ``batch_size`` readings (at least one
        delivery), waiting at most ``batch_linger_s`` after the first for a fuller batch.

        Only this batch's deliveries are decoded, and a delivery decoded but left for the
        next batch keeps what it decoded."""
        while not self._received:
            if self._stopping:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        linger_until = self._received[0].received + self._batch_linger_s
        batch: list[_Delivery] = []
        readings = 0
        while True:
            while self._received:
                head = self._received[0]
                head.decode(self._limits)
                if batch and readings + head.weight > self._batch_size:
                    return batch  # full: the head begins the next batch
                batch.append(self._received.popleft())
                readings += head.weight
            remaining_s = linger_until - time.monotonic()
            # With the prefetch window full the broker sends nothing more until we settle:
            # lingering could not make the batch any fuller (small messages, big batches).
            window_full = self._unsettled >= self._prefetch
            if readings >= self._batch_size or window_full or self._stopping or remaining_s <= 0:
                return batch
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self._arrived.wait()
            except TimeoutError:
                return batch

    async def _handle(self, batch: list[_Delivery]) -> None:
        self._batch_sizes.observe(sum(delivery.weight for delivery in batch))
        settled_first: list[tuple[_Delivery, Outcome]] = []
        good: list[_Delivery] = []
        for delivery in batch:
            if delivery.unreadable is not None:
                settled_first.append((delivery, DeadLetter(delivery.unreadable)))
            elif delivery.invalid and not await self._dead_letter_invalid(delivery):
                settled_first.append((delivery, Requeue()))
            else:
                good.append(delivery)
        await self._settle(settled_first)
        if good:
            await self._settle(await self._handled(good))

    async def _handled(self, good: list[_Delivery]) -> list[tuple[_Delivery, Outcome]]:
        """Ack for all when the handler takes the batch; else delivery by delivery."""
        try:
            await self._handle_readings([r for delivery in good for r in delivery.readings])
        except Exception:
            log.exception(
                "unexpected failure handling a batch; handling it delivery by delivery",
                extra={"queue": self._queue_name, "batch": len(good)},
            )
        else:
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "batch handled",
                    extra={"queue": self._queue_name, "batch": len(good), **_request_ids(good)},
                )
            return [(delivery, Ack()) for delivery in good]
        outcomes: list[tuple[_Delivery, Outcome]] = []
        for delivery in good:
            try:
                with _bound_to(delivery):
                    await self._handle_readings(delivery.readings)
            except Exception:
                log.exception(
                    "unexpected failure handling a message; requeueing it",
                    extra={
                        "message_id": delivery.message.message_id,
                        "readings": len(delivery.readings),
                        "queue": self._queue_name,
                        LOG_FIELD: from_message_headers(delivery.message.headers),
                    },
                )
                outcomes.append((delivery, Requeue()))
            else:
                outcomes.append((delivery, Ack()))
        return outcomes

    async def _handle_readings(self, readings: list[Reading]) -> None:
        if readings:  # a batch message may hold only invalid elements, or none
            await self._handler(readings)

    async def _settle(self, outcomes: list[tuple[_Delivery, Outcome]]) -> None:
        """The acknowledgement policy: each outcome's broker action, in this order."""
        for kind, settle in (
            (DeadLetter, self._dead_letter_all),
            (Requeue, self._requeue_all),
            (Ack, self._ack),  # last: its ack(multiple=True) must not cover the others
        ):
            chosen = [(d, o) for d, o in outcomes if isinstance(o, kind)]
            if chosen:
                await settle(chosen)

    async def _dead_letter_all(self, outcomes: list[tuple[_Delivery, Outcome]]) -> None:
        for delivery, outcome in outcomes:
            assert isinstance(outcome, DeadLetter)
            with _bound_to(delivery):
                await self._dead_letter(delivery, outcome.reason)

    async def _requeue_all(self, outcomes: list[tuple[_Delivery, Outcome]]) -> None:
        await self._requeue([delivery for delivery, _ in outcomes])

    async def _ack(self, outcomes: list[tuple[_Delivery, Outcome]]) -> None:
        """One ``ack(multiple=True)`` on the last delivery of each channel: one channel,
        unless the connection was re-established during the batch."""
        by_channel: dict[int, list[_Delivery]] = {}
        for delivery, _ in outcomes:
            try:
                channel = delivery.message.channel
            except Exception:  # closed: the broker took the delivery back and redelivers it
                log.info(
                    "channel closed before the ack; the broker redelivers",
                    extra={"message_id": delivery.message.message_id},
                )
                continue
            by_channel.setdefault(id(channel), []).append(delivery)
        acked: list[_Delivery] = []
        for deliveries in by_channel.values():
            last = max(deliveries, key=lambda delivery: delivery.message.delivery_tag or 0)
            try:
                await last.message.ack(multiple=True)
            except Exception:  # channel gone: the broker redelivers unacked messages anyway
                log.warning("could not ack; the broker will redeliver", exc_info=True)
            else:
                acked += deliveries
        finished, now = time.monotonic(), datetime.now(UTC)
        for delivery in acked:
            self._processing.observe(finished - delivery.received)
        instants = Tally(reading.timestamp for delivery in acked for reading in delivery.readings)
        for instant, readings in instants.items():
            observe_times(self._lag, (now - instant).total_seconds(), readings)
        everything = [delivery for delivery, _ in outcomes]
        self._settle_deliveries(everything)
        self._messages["acked"].inc(len(acked))
        self._readings["acked"].inc(sum(len(delivery.readings) for delivery in acked))
        self._readings["dead_lettered"].inc(sum(len(delivery.invalid) for delivery in acked))
        not_acked = set(everything).difference(acked)  # their channel closed: redelivered
        self._count_requeued(list(not_acked))

    async def _requeue(self, deliveries: list[_Delivery]) -> None:
        for delivery in deliveries:
            await _requeue(delivery.message)
        self._settle_deliveries(deliveries)
        self._count_requeued(deliveries)

    def _count_requeued(self, deliveries: list[_Delivery]) -> None:
        self._messages["requeued"].inc(len(deliveries))
        self._readings["requeued"].inc(sum(delivery.count for delivery in deliveries))

    def _settle_deliveries(self, deliveries: list[_Delivery]) -> None:
        for delivery in deliveries:
            if not delivery.settled:
                delivery.settled = True
                self._unsettled -= 1
                self._in_flight.dec()

    async def _dead_letter(self, delivery: _Delivery, reason: str) -> None:
        """Publish to the dead-letter exchange with the reason, confirmed, then ack."""
        assert self._dead_letter_exchange is not None
        message = delivery.message
        log.warning(
            "dead-lettering a poison message",
            extra={
                "message_id": message.message_id,
                "reason": reason,
                "queue": self._queue_name,
                LOG_FIELD: from_message_headers(message.headers),
            },
        )
        headers = dict(message.headers or {})
        headers.update({REASON_HEADER: reason, ORIGINAL_QUEUE_HEADER: self._queue_name})
        try:
            await self._dead_letter_exchange.publish(
                persistent_copy(message, headers), routing_key=message.routing_key or ROUTING_KEY
            )
        except Exception:
            log.exception("could not dead-letter; requeueing", extra={"reason": reason})
            await self._requeue([delivery])
            return
        try:
            await message.ack()
        except Exception:  # channel gone: redelivered, and dead-lettered again
            log.warning("could not ack a dead letter; the broker will redeliver", exc_info=True)
        self._settle_deliveries([delivery])
        self._messages["dead_lettered"].inc()
        self._readings["dead_lettered"].inc(delivery.count)
        self._processing.observe(time.monotonic() - delivery.received)

    async def _dead_letter_invalid(self, delivery: _Delivery) -> bool:
        """Publish each invalid element of a batch to the dead-letter exchange alone, as the
        version-1 message it would have been, all confirmed; False if one was not (then the
        delivery is requeued whole).

        The delivery is acked only later, once its valid readings are handled. A crash in
        between (or a handler failure that requeues it) redelivers it, and its elements are
        dead-lettered again: the same message id shows twice in ``make dlq``, and replaying
        both bills the reading once (idempotency is per reading id). Avoiding that would take
        a record of dead-lettered elements, written to a store on every such batch, for a
        rare crash; and the same holds already for a whole poison message whose ack is lost
        after its dead letter was confirmed.
        """
        assert self._dead_letter_exchange is not None
        message = delivery.message
        base = dict(message.headers or {})
        base[ORIGINAL_QUEUE_HEADER] = self._queue_name
        if message.message_id:
            base[BATCH_ID_HEADER] = message.message_id
        letters = []
        for number, element in enumerate(delivery.invalid):
            message_id = _reading_id(element) or _nth_invalid(message.message_id, number)
            log.warning(
                "dead-lettering an invalid reading of a batch",
                extra={
                    "message_id": message_id,
                    "batch_id": message.message_id,
                    "reason": element.reason,
                    "queue": self._queue_name,
                    LOG_FIELD: from_message_headers(message.headers),
                },
            )
            letter = aio_pika.Message(
                element.body,
                headers={**base, REASON_HEADER: element.reason},
                content_type=CONTENT_TYPE,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            letters.append(self._dead_letter_exchange.publish(letter, routing_key=ROUTING_KEY))
        # Confirmed together: a batch from a foreign publisher may be wholly invalid.
        results = await asyncio.gather(*letters, return_exceptions=True)
        failures = [result for result in results if isinstance(result, Exception)]
        if failures:
            log.error(
                "could not dead-letter an invalid reading; requeueing its message",
                exc_info=failures[0],
                extra={"message_id": message.message_id, "failed": len(failures)},
            )
            return False
        return True


def _reading_id(element: InvalidElement) -> str | None:
    """The reading id an invalid element carries, if it has a usable one."""
    try:
        data = json.loads(element.body)
    except ValueError:
        return None
    found = data.get("reading_id") if isinstance(data, dict) else None
    return found if isinstance(found, str) and found else None


def _nth_invalid(batch_id: str | None, number: int) -> str | None:
    """A message id for an invalid element without a reading id, stable on redelivery."""
    return f"{batch_id}:invalid-{number}" if batch_id else None


def _bound_to(delivery: _Delivery) -> AbstractContextManager[object]:
    """Log lines about one delivery carry the request id its message came with."""
    request_id = from_message_headers(delivery.message.headers)
    return bound(request_id) if request_id else nullcontext()


def _request_ids(good: list[_Delivery], most: int = 100) -> dict[str, object]:
    """The distinct request ids of a batch (a stream is one request), at most ``most``."""
    found = {from_message_headers(delivery.message.headers) for delivery in good} - {None}
    return {f"{LOG_FIELD}s": sorted(found)[:most], "request_id_count": len(found)}


async def _requeue(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception:  # channel gone: the broker redelivers unacked messages anyway
        log.warning("could not requeue; the broker will redeliver", exc_info=True)
