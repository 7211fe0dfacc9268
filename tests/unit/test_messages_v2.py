"""Broker messages of schema version 2 (a batch of readings), and what consumers make of them.

The codec: round trip, the edge cases of a batch (no readings, elements that are not
objects, NaN, wrong types, unknown versions), an invalid element coming apart as the
version-1 body it would have had. Then the consumer's pure parts: batches gathered by
readings (a delivery never split), and how ``make dlq`` describes either kind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aio_pika
import pytest
from prometheus_client import REGISTRY

from common.consumer import BATCH_ID_HEADER, ORIGINAL_QUEUE_HEADER, ReadingConsumer, _Delivery
from common.messages import (
    Decoded,
    PoisonMessage,
    decode,
    encode_batch,
    encode_reading,
)
from common.models import DEFAULT_LIMITS, Reading, validate_reading
from common.rabbit import REASON_HEADER, Topology
from scripts.dlq import _holds

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def reading(minute: int, device: str = "meter-1", kwh: float = 0.125) -> Reading:
    return validate_reading(
        device, datetime(2026, 11, 22, 11, minute, 0, 123456, tzinfo=UTC), kwh, now=NOW
    )


READINGS = [reading(1), reading(2, device="meter-2", kwh=0), reading(3, kwh=1e6)]


def element(r: Reading = READINGS[0], **changes: object) -> dict[str, object]:
    data = json.loads(encode_reading(r))
    del data["schema_version"]
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def batch_body(elements: list[object], batch_id: str = "b-1", version: object = 2) -> bytes:
    return json.dumps(
        {"schema_version": version, "batch_id": batch_id, "readings": elements}
    ).encode()


# --- the codec --------------------------------------------------------------------------


def test_round_trip_is_exact_and_in_order() -> None:
    assert decode(encode_batch(READINGS, "b-1"), now=NOW) == Decoded(READINGS, [])


def test_body_is_readable_json_with_its_version_and_batch_id() -> None:
    body = json.loads(encode_batch(READINGS[:1], "b-1"))
    assert body == {
        "schema_version": 2,
        "batch_id": "b-1",
        "readings": [
            {
                "reading_id": READINGS[0].reading_id,
                "device_id": "meter-1",
                "timestamp": "2026-11-22T11:01:00.123456+00:00",
                "usage_kwh": 0.125,
            }
        ],
    }


def test_version_1_decodes_as_one_reading() -> None:
    assert decode(encode_reading(READINGS[0]), now=NOW) == Decoded([READINGS[0]], [])


def test_an_empty_batch_holds_nothing_and_is_not_poison() -> None:
    assert decode(encode_batch([], "b-empty"), now=NOW) == Decoded([], [])


def test_a_reading_repeated_inside_a_batch_is_returned_twice() -> None:
    """Deduplication is per reading id and is the consumers' (billing, analytics) job."""
    decoded = decode(encode_batch([READINGS[0], READINGS[1], READINGS[0]], "b-1"), now=NOW)
    assert decoded.readings == [READINGS[0], READINGS[1], READINGS[0]]


@pytest.mark.parametrize("bad", [1, None, "x", [1], True])
def test_an_element_that_is_not_an_object_comes_apart_alone(bad: object) -> None:
    decoded = decode(batch_body([element(), bad, element(READINGS[1])]), now=NOW)
    assert decoded.readings == [READINGS[0], READINGS[1]]
    [invalid] = decoded.invalid
    assert invalid.body == json.dumps(bad).encode()
    assert invalid.reason == "readings[1] of batch 'b-1': is not a JSON object"


def test_a_nan_element_is_dead_lettered_as_the_version_1_body_it_would_have_had() -> None:
    raw = json.dumps(
        {"schema_version": 2, "batch_id": "b-1", "readings": [element(), element(usage_kwh=1.0)]}
    ).replace("1.0", "NaN")
    decoded = decode(raw.encode(), now=NOW)
    assert decoded.readings == [READINGS[0]]
    [invalid] = decoded.invalid
    assert "readings[1] of batch 'b-1'" in invalid.reason and "finite" in invalid.reason
    assert b'"usage_kwh":NaN' in invalid.body
    alone = json.loads(invalid.body)  # json reads NaN
    assert alone["schema_version"] == 1 and alone["reading_id"] == READINGS[0].reading_id
    with pytest.raises(PoisonMessage, match="finite"):  # alone, it is poison for the same cause
        decode(invalid.body, now=NOW)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"usage_kwh": "1.5"}, "'usage_kwh' is missing or has the wrong type"),
        ({"usage_kwh": True}, "'usage_kwh' is missing or has the wrong type"),
        ({"device_id": 7}, "'device_id' is missing or has the wrong type"),
        ({"device_id": ...}, "'device_id' is missing"),
        ({"reading_id": None}, "'reading_id' is missing or has the wrong type"),
        ({"reading_id": ""}, "'reading_id' is empty"),
        ({"timestamp": 1700000000}, "'timestamp' is missing or has the wrong type"),
        ({"timestamp": "yesterday"}, "not ISO-8601"),
        ({"usage_kwh": -1}, "cannot be negative"),
        ({"usage_kwh": 2e6}, "above the limit"),
        ({"timestamp": (NOW + timedelta(hours=1)).isoformat()}, "ahead of the server clock"),
    ],
)
def test_an_invalid_element_comes_apart_with_its_reason_and_spares_its_neighbours(
    changes: dict[str, object], reason: str
) -> None:
    decoded = decode(batch_body([element(READINGS[1]), element(**changes), element()]), now=NOW)
    assert decoded.readings == [READINGS[1], READINGS[0]]
    [invalid] = decoded.invalid
    assert invalid.reason.startswith("readings[1] of batch 'b-1': ")
    assert reason in invalid.reason
    assert json.loads(invalid.body) == {"schema_version": 1, **element(**changes)}
    with pytest.raises(PoisonMessage) as alone:
        decode(invalid.body, now=NOW)
    assert reason in str(alone.value)


def test_a_batch_of_invalid_elements_only_has_no_readings() -> None:
    decoded = decode(batch_body([element(usage_kwh=-1), 5]), now=NOW)
    assert decoded.readings == []
    assert [i.reason[:13] for i in decoded.invalid] == ["readings[0] o", "readings[1] o"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (batch_body([element()], version=3), "unsupported schema_version 3; expected one of"),
        (batch_body([element()], version="2"), "unsupported schema_version '2'"),
        (batch_body([element()], version=None), "unsupported schema_version None"),
        (b'{"schema_version": 2, "batch_id": "b"}', "'readings' is missing or is not a list"),
        (b'{"schema_version": 2, "readings": {}}', "'readings' is missing or is not a list"),
        (b'{"schema_version": 2, "readings": null}', "'readings' is missing or is not a list"),
        (b"[]", "not a JSON object"),
        (b"\xff", "not JSON"),
    ],
)
def test_a_whole_message_that_cannot_be_read_is_poison(raw: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage) as caught:
        decode(raw, now=NOW)
    assert reason in str(caught.value)


def test_deep_nesting_is_poison() -> None:
    with pytest.raises(PoisonMessage, match="nested too deeply"):
        decode(b"[" * 100_000, now=NOW)


@pytest.mark.parametrize("version", [b"true", b"1.0", b"2.0", b'"1"'])
def test_a_version_is_a_whole_number_not_something_python_calls_equal(version: bytes) -> None:
    with pytest.raises(PoisonMessage, match="unsupported schema_version"):
        decode(b'{"schema_version": ' + version + b', "readings": []}', now=NOW)


def test_an_invalid_element_is_dead_lettered_as_version_1_whatever_it_claims() -> None:
    body = b'{"schema_version": 2, "batch_id": "b", "readings": [{"schema_version": 7}]}'
    (invalid,) = decode(body, now=NOW).invalid
    assert json.loads(invalid.body)["schema_version"] == 1


# --- the consumer: batches gathered by readings -------------------------------------------


def message(body: bytes, message_id: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(body=body, message_id=message_id, redelivered=False, headers={})


def consumer(batch_size: int, prefetch: int = 1000, linger_s: float = 0.0) -> ReadingConsumer:
    async def handler(readings: object) -> None:
        return None

    return ReadingConsumer(
        "unit",
        "amqp://unused",
        Topology("unit-"),
        "unit.readings",
        handler,
        prefetch,
        DEFAULT_LIMITS,
        batch_size=batch_size,
        batch_linger_s=linger_s,
    )


def batch_of(size: int, start: int = 0) -> bytes:
    """A version-2 body of ``size`` readings valid now (the consumer decodes with its clock)."""
    now = datetime.now(UTC)
    readings = [
        validate_reading(f"m-{start + n}", now - timedelta(minutes=1), 1, now=now)
        for n in range(size)
    ]
    return encode_batch(readings, f"b-{start}")


async def gathered(c: ReadingConsumer, sizes: list[int]) -> list[list[int]]:
    """Deliver messages of ``sizes`` readings; the batches they form, as their sizes."""
    for number, size in enumerate(sizes):
        await c._on_message(message(batch_of(size, start=1000 * number)))  # type: ignore[arg-type]
    batches = []
    while c._received:
        batch = await c._next_batch()
        assert batch is not None
        batches.append([d.count for d in batch])
    return batches


async def test_batches_are_gathered_by_readings_and_a_delivery_is_never_split() -> None:
    assert await gathered(consumer(batch_size=500), [1, 500, 1, 1]) == [[1], [500], [1, 1]]
    assert await gathered(consumer(batch_size=1000), [500, 500, 500]) == [[500, 500], [500]]
    assert await gathered(consumer(batch_size=100), [30, 2000, 30]) == [[30], [2000], [30]]
    assert await gathered(consumer(batch_size=3), [1, 1, 1, 1, 1]) == [[1, 1, 1], [1, 1]]


async def test_a_message_without_readings_weighs_one_in_a_batch() -> None:
    c = consumer(batch_size=2)
    for body in (b"{not json", encode_batch([], "empty"), encode_reading(READINGS[0])):
        await c._on_message(message(body))  # type: ignore[arg-type]
    first = await c._next_batch()
    assert first is not None and [d.count for d in first] == [1, 0]
    assert first[0].unreadable is not None and first[0].unreadable.startswith("body is not JSON")


async def test_a_full_prefetch_window_ends_the_linger() -> None:
    """The broker delivers no more than the window: waiting for a fuller batch is useless."""
    c = consumer(batch_size=2500, prefetch=3, linger_s=30)
    for n in range(3):
        await c._on_message(message(batch_of(1, start=n)))  # type: ignore[arg-type]
    batch = await asyncio.wait_for(c._next_batch(), timeout=5)
    assert batch is not None and len(batch) == 3


def test_undecodable_is_dead_lettered(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoder failure other than PoisonMessage is the body's forever: no requeue loop."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the decoder")

    monkeypatch.setattr("common.consumer.decode", broken)
    delivery = _Delivery(message(b"{}"), 0.0)  # type: ignore[arg-type]
    delivery.decode(DEFAULT_LIMITS)
    assert delivery.unreadable is not None and "could not be decoded" in delivery.unreadable
    assert delivery.count == 1


# --- make dlq: what a dead letter holds --------------------------------------------------


def test_dlq_describes_both_versions() -> None:
    assert _holds(encode_reading(READINGS[0])) == f"reading {READINGS[0].reading_id!r}"
    assert _holds(encode_batch(READINGS, "b-7")) == "batch 'b-7' of 3 readings"
    assert _holds(b'{"schema_version": 2, "batch_id": "b"}') == "batch 'b' of no list of readings"
    assert _holds(b'{"schema_version": 9}') == "schema_version 9"
    assert _holds(b"{not json") == "not JSON"
    assert _holds(b"NaN") == "not a JSON object"


# --- the consumer: settling a batch (fake broker objects) ---------------------------------


class Broker:
    """What the consumer did to the broker, in order: acks, requeues and dead letters."""

    def __init__(self, failing_publishes: int = 0) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.letters: list[object] = []
        self.failing_publishes = failing_publishes
        self.channel = object()

    async def publish(self, letter: object, routing_key: str) -> None:  # the DLX
        if self.failing_publishes:
            self.failing_publishes -= 1
            raise ConnectionError("publish failed (injected)")
        self.letters.append(letter)
        self.calls.append(("dead-letter", getattr(letter, "message_id", None)))


class FakeMessage(SimpleNamespace):
    async def ack(self, multiple: bool = False) -> None:
        self.broker.calls.append(("ack", self.delivery_tag, multiple))

    async def nack(self, requeue: bool = True) -> None:
        self.broker.calls.append(("requeue", self.delivery_tag))


async def settled(
    c: ReadingConsumer, broker: Broker, bodies: list[tuple[bytes, str | None]]
) -> list[tuple[object, ...]]:
    """Deliver ``(body, message_id)`` pairs as one batch, handle it; the broker calls made."""
    c._dead_letter_exchange = broker  # type: ignore[assignment]
    for tag, (body, message_id) in enumerate(bodies, start=1):
        await c._on_message(
            FakeMessage(  # type: ignore[arg-type]
                body=body,
                message_id=message_id,
                delivery_tag=tag,
                redelivered=False,
                headers={"x-request-id": "req-1"},
                routing_key="reading.v1",
                content_type="application/json",
                channel=broker.channel,
                broker=broker,
            )
        )
    batch = await c._next_batch()
    assert batch is not None and len(batch) == len(bodies)
    await c._handle(batch)
    return broker.calls


def handled_consumer(name: str, fails: Callable[[Sequence[Reading]], bool]) -> ReadingConsumer:
    handled: list[list[Reading]] = []

    async def handler(readings: Sequence[Reading]) -> None:
        if fails(readings):
            raise RuntimeError("handler failed (injected)")
        handled.append(list(readings))

    c = ReadingConsumer(
        name,
        "amqp://unused",
        Topology("unit-"),
        "unit.readings",
        handler,
        100,
        DEFAULT_LIMITS,
        batch_size=2500,
    )
    c.handled = handled  # type: ignore[attr-defined]
    return c


def counted(name: str, metric: str, outcome: str) -> float:
    labels = {"consumer": name, "outcome": outcome}
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def fresh(size: int, start: int) -> list[Reading]:
    now = datetime.now(UTC)
    return [
        validate_reading(f"m-{start + n}", now - timedelta(minutes=1), 1, now=now)
        for n in range(size)
    ]


async def test_after_a_handler_failure_only_the_failing_delivery_is_requeued() -> None:
    first, cursed, third = fresh(3, 0), fresh(2, 10), fresh(4, 20)
    name = "unit-fallback"
    c = handled_consumer(name, lambda readings: cursed[0] in readings)
    calls = await settled(
        c,
        Broker(),
        [(encode_batch(first, "b1"), "b1"), (encode_batch(cursed, "b2"), "b2"),
         (encode_batch(third, "b3"), "b3")],
    )  # fmt: skip
    # The requeue goes first, so that the ack of the last delivery cannot cover it.
    assert calls == [("requeue", 2), ("ack", 3, True)]
    assert c.handled == [first, third]  # type: ignore[attr-defined]
    assert counted(name, "consumer_messages_total", "requeued") == 1
    assert counted(name, "consumer_messages_total", "acked") == 2
    assert counted(name, "consumer_readings_total", "requeued") == 2
    assert counted(name, "consumer_readings_total", "acked") == 7
    assert c._unsettled == 0


async def test_an_invalid_element_is_dead_lettered_alone_before_its_delivery_is_acked() -> None:
    good = fresh(2, 0)
    raw = json.loads(encode_batch(good, "b-mixed"))
    raw["readings"].insert(1, {**raw["readings"][0], "reading_id": "bad-1", "usage_kwh": -1})
    raw["readings"].append("not an object")
    name = "unit-elements"
    c = handled_consumer(name, lambda readings: False)
    broker = Broker()
    calls = await settled(
        c, broker, [(json.dumps(raw).encode(), "b-mixed"), (b"{not json", "poison-1")]
    )
    assert calls == [
        ("dead-letter", "bad-1"),  # its reading id
        ("dead-letter", "b-mixed:invalid-1"),  # none: the batch's id and its place
        ("dead-letter", "poison-1"),  # a whole message: dead-lettered, then acked alone
        ("ack", 2, False),
        ("ack", 1, True),
    ]
    assert c.handled == [good]  # type: ignore[attr-defined]
    alone = broker.letters[0]
    assert json.loads(alone.body) == {**raw["readings"][1], "schema_version": 1}
    assert alone.headers == {
        "x-request-id": "req-1",
        REASON_HEADER: "readings[1] of batch 'b-mixed': invalid reading: usage_kwh: is -1.0; "
        "energy used in an interval cannot be negative",
        ORIGINAL_QUEUE_HEADER: "unit.readings",
        BATCH_ID_HEADER: "b-mixed",
    }
    assert alone.content_type == "application/json"
    assert alone.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert counted(name, "consumer_messages_total", "acked") == 1
    assert counted(name, "consumer_messages_total", "dead_lettered") == 1
    assert counted(name, "consumer_readings_total", "acked") == 2
    assert counted(name, "consumer_readings_total", "dead_lettered") == 3  # 2 elements, 1 whole


async def test_an_element_not_dead_lettered_requeues_its_delivery_unhandled() -> None:
    good = fresh(2, 0)
    raw = json.loads(encode_batch(good, "b-mixed"))
    raw["readings"].append(5)
    other = fresh(1, 10)
    c = handled_consumer("unit-dlx-down", lambda readings: False)
    calls = await settled(
        c,
        Broker(failing_publishes=1),
        [(json.dumps(raw).encode(), "b-mixed"), (encode_batch(other, "b-other"), "b-other")],
    )
    assert calls == [("requeue", 1), ("ack", 2, True)]
    assert c.handled == [other]  # type: ignore[attr-defined]
