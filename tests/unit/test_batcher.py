"""SendReading calls gathered into publishes without a timer: the batcher against a fake
ingestion whose publishes the test confirms or fails one by one (no clock involved)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from api_gateway.batcher import BatcherClosed, UnaryBatcher
from common import request_id
from common.convert import reading_to_proto
from common.energy.v1 import reading_pb2
from common.models import validate_reading

NOW = datetime.now(UTC).replace(microsecond=0)


def reading(n: int) -> reading_pb2.Reading:
    return reading_to_proto(
        validate_reading(f"meter-{n}", NOW - timedelta(minutes=n), 0.5, now=NOW)
    )


class FakeIngestion:
    """Records each publish (device ids, request id) and holds it until the test settles it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.request_ids: list[str | None] = []
        self.confirms: list[asyncio.Future[None]] = []

    async def publish(self, readings: list[reading_pb2.Reading]) -> None:
        self.batches.append([r.device_id for r in readings])
        self.request_ids.append(request_id.current())
        confirm = asyncio.get_running_loop().create_future()
        self.confirms.append(confirm)
        await confirm

    def confirm(self, index: int) -> None:
        self.confirms[index].set_result(None)


async def run_ready_tasks() -> None:
    """Let every task that can run, run: no time passes, so nothing waits on a timer."""
    for _ in range(10):
        await asyncio.sleep(0)


def send(batcher: UnaryBatcher, n: int, the_id: str | None = None) -> asyncio.Task[None]:
    async def call() -> None:
        if the_id is None:
            await batcher.send(reading(n))
        else:
            with request_id.bound(the_id):
                await batcher.send(reading(n))

    return asyncio.create_task(call())


async def test_a_lone_call_is_published_at_once_and_answered_after_its_confirm() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    call = send(batcher, 1)
    await run_ready_tasks()
    assert fake.batches == [["meter-1"]], "published without waiting for company"
    assert not call.done(), "not answered before the confirm"
    fake.confirm(0)
    await call
    assert (batcher.waiting, batcher.in_flight) == (0, 0)


async def test_calls_arriving_while_a_publish_waits_form_the_next_batch() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    first = send(batcher, 1)
    await run_ready_tasks()
    gathered = [send(batcher, n) for n in range(2, 7)]
    await run_ready_tasks()
    assert fake.batches == [["meter-1"]] and batcher.waiting == 5
    fake.confirm(0)
    await first
    await run_ready_tasks()
    assert fake.batches[1] == [f"meter-{n}" for n in range(2, 7)]
    assert not any(call.done() for call in gathered)
    fake.confirm(1)
    await asyncio.gather(*gathered)


async def test_several_publishes_may_wait_at_once_up_to_the_setting() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=2)
    calls = [send(batcher, 1)]
    await run_ready_tasks()
    calls.append(send(batcher, 2))
    await run_ready_tasks()
    calls += [send(batcher, n) for n in (3, 4)]
    await run_ready_tasks()
    assert fake.batches == [["meter-1"], ["meter-2"]] and batcher.in_flight == 2
    fake.confirm(1)  # the second confirms first: its slot takes the next batch
    await run_ready_tasks()
    assert fake.batches[2] == ["meter-3", "meter-4"]
    assert calls[1].done() and not calls[0].done()
    fake.confirm(0)
    fake.confirm(2)
    await asyncio.gather(*calls)


async def test_a_batch_holds_at_most_the_size_cap() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=3, max_in_flight_batches=1)
    calls = [send(batcher, 0)]
    await run_ready_tasks()
    calls += [send(batcher, n) for n in range(1, 8)]
    await run_ready_tasks()
    for index in range(4):
        fake.confirm(index)
        await run_ready_tasks()
    await asyncio.gather(*calls)
    assert [len(batch) for batch in fake.batches] == [1, 3, 3, 1]


async def test_a_failed_publish_fails_exactly_the_calls_of_its_batch() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    first = send(batcher, 1)
    await run_ready_tasks()
    failing = [send(batcher, n) for n in (2, 3, 4)]
    await run_ready_tasks()
    fake.confirm(0)
    await run_ready_tasks()
    later = send(batcher, 5)  # arrives while the failing batch is in flight
    await run_ready_tasks()
    refused = RuntimeError("queue full")
    fake.confirms[1].set_exception(refused)
    await run_ready_tasks()
    fake.confirm(2)
    await first
    await later
    for call in failing:
        with pytest.raises(RuntimeError) as caught:
            await call
        assert caught.value is refused, "each call answers with the batch's own error"
    assert fake.batches == [["meter-1"], ["meter-2", "meter-3", "meter-4"], ["meter-5"]]


async def test_a_caller_giving_up_neither_fails_nor_holds_the_others() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    first = send(batcher, 1)
    await run_ready_tasks()
    two, three, four = (send(batcher, n) for n in (2, 3, 4))
    await run_ready_tasks()
    three.cancel()  # still queued: its reading is left out of the next batch
    await run_ready_tasks()
    fake.confirm(0)
    await first
    await run_ready_tasks()
    assert fake.batches[1] == ["meter-2", "meter-4"]
    two.cancel()  # its batch already in flight: the others of it do not notice
    await run_ready_tasks()
    fake.confirm(1)
    await four
    for cancelled in (two, three):
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    assert (batcher.waiting, batcher.in_flight) == (0, 0)


async def test_the_publish_runs_under_the_first_callers_request_id() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    first = send(batcher, 1, "caller-a")
    await run_ready_tasks()
    rest = [send(batcher, 2, "caller-b"), send(batcher, 3, "caller-c")]
    await run_ready_tasks()
    fake.confirm(0)
    await run_ready_tasks()
    fake.confirm(1)
    await asyncio.gather(first, *rest)
    assert fake.request_ids == ["caller-a", "caller-b"]


async def test_close_fails_queued_and_in_flight_calls_and_refuses_new_ones() -> None:
    fake = FakeIngestion()
    batcher = UnaryBatcher(fake.publish, max_batch_readings=500, max_in_flight_batches=1)
    in_flight = send(batcher, 1)
    await run_ready_tasks()
    queued = send(batcher, 2)
    await run_ready_tasks()
    await batcher.close()
    for call in (in_flight, queued):
        with pytest.raises(BatcherClosed):
            await call
    with pytest.raises(BatcherClosed):
        await batcher.send(reading(3))
    assert fake.batches == [["meter-1"]] and (batcher.waiting, batcher.in_flight) == (0, 0)
