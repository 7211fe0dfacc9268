"""Concurrent ``SendReading`` calls gathered into one ``Publish`` to ingestion, without a timer.

Each call puts its reading in a queue and waits. Whenever fewer than
``max_in_flight_batches`` publishes are waiting for their confirms, whatever is queued goes
out at once as one publish (up to ``max_batch_readings``); the calls that arrive while the
publishes are in flight form the next batch. So a lone call on an idle gateway is published
at once, and under load each publish carries the calls of one confirm's wait: the broker
sees one message where it saw one per call (ingestion publishes a forwarded batch as one
message), and the gateway makes one call to ingestion where it made one per reading.

A call's answer is its batch's: OK once the broker confirmed the message holding its
reading; a failure (whatever ``publish`` raised) fails every call of that batch, each
answering as a single call would have. A caller that gives up (cancelled, past its
deadline) cancels only its own wait: a reading not yet taken is left out, one already in a
publish is published anyway (its caller resends, and a resent reading is deduplicated).

The request id: a batch carries many calls' ids. The publish runs under the id of the
batch's first call (sent to ingestion and on the message as ``x-request-id``); the ids of
all its calls are logged with it at debug, so a caller's id leads to its batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Histogram

from common import request_id
from common.energy.v1 import reading_pb2

log = logging.getLogger(__name__)

Publish = Callable[[list[reading_pb2.Reading]], Awaitable[None]]

BATCH_READINGS = Histogram(
    "gateway_unary_batch_readings",
    "SendReading calls gathered into one publish to ingestion.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)


class BatcherClosed(Exception):
    """The gateway is shutting down: the reading was not published; the caller may resend."""


@dataclass
class _Call:
    reading: reading_pb2.Reading
    request_id: str | None
    answer: asyncio.Future[None]


class UnaryBatcher:
    """Gathers readings of concurrent calls into publishes of at most ``max_batch_readings``,
    at most ``max_in_flight_batches`` of them waiting for confirms at once."""

    def __init__(
        self, publish: Publish, max_batch_readings: int, max_in_flight_batches: int
    ) -> None:
        self._publish = publish
        self._max_batch_readings = max_batch_readings
        self._max_in_flight_batches = max_in_flight_batches
        self._waiting: deque[_Call] = deque()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def waiting(self) -> int:
        """Calls queued, not yet in a publish."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Publishes waiting for their confirms."""
        return len(self._in_flight)

    async def send(self, reading: reading_pb2.Reading) -> None:
        """Return once the publish holding ``reading`` is confirmed; raise what it raised."""
        if self._closed:
            raise BatcherClosed("the gateway is shutting down; resend the reading")
        call = _Call(reading, request_id.current(), asyncio.get_running_loop().create_future())
        self._waiting.append(call)
        self._start_batches()
        # Cancelling this caller cancels only its own future (the batch goes on without it).
        await call.answer

    def _start_batches(self) -> None:
        while self._waiting and len(self._in_flight) < self._max_in_flight_batches:
            batch = self._take_batch()
            if not batch:
                return
            # A context of its own: the batch runs for many callers, not in the first's.
            task = asyncio.create_task(self._run(batch), context=contextvars.Context())
            self._in_flight.add(task)
            task.add_done_callback(self._finished)

    def _take_batch(self) -> list[_Call]:
        batch: list[_Call] = []
        while self._waiting and len(batch) < self._max_batch_readings:
            call = self._waiting.popleft()
            if not call.answer.done():  # its caller gave up: leave its reading out
                batch.append(call)
        return batch

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._start_batches()  # what gathered meanwhile goes out now

    async def _run(self, batch: list[_Call]) -> None:
        BATCH_READINGS.observe(len(batch))
        the_id = batch[0].request_id or request_id.new_request_id()
        failure: BaseException | None = None
        with request_id.bound(the_id):
            log.debug(
                "publishing a batch of calls",
                extra={"readings": len(batch), "request_ids": [c.request_id for c in batch]},
            )
            try:
                await self._publish([call.reading for call in batch])
            except Exception as error:  # every call of the batch answers with it
                failure = error
            except asyncio.CancelledError:  # close(): the publish was cut off
                failure = BatcherClosed("the gateway shut down before the broker confirmed")
                raise
            finally:
                _settle(batch, failure)

    async def close(self) -> None:
        """Refuse new calls, fail the queued ones and cut off publishes still in flight.

        Called after the gRPC server's grace period, when no caller waits any more: during
        the grace, batches went on being published and answered as usual.
        """
        self._closed = True
        _settle(list(self._waiting), BatcherClosed("the gateway shut down; resend"))
        self._waiting.clear()
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)


def _settle(batch: list[_Call], failure: BaseException | None) -> None:
    for call in batch:
        if call.answer.done():  # its caller gave up meanwhile
            continue
        if failure is None:
            call.answer.set_result(None)
        else:
            call.answer.set_exception(failure)
