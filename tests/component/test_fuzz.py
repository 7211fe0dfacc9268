"""Fuzzing SendReading and SendReadings over every field of a Reading (hypothesis).

Every answer is OK or INVALID_ARGUMENT (the admin token may send for any device and the
test's own rate-limit buckets are far from empty, so no other status is right),
INVALID_ARGUMENT names the field in a printable message, and after every example the billing
queue holds exactly the readings that example was answered OK for, each one decoding (and
so re-validating) with the consumers' decoder. Each test stands alone: the queue is emptied
and compared after every example, never by a later test.

How it runs: the fuzz tests are ``async def`` functions under ``@given``. pytest-asyncio
recognises such tests and runs each example's coroutine on the session event loop, the loop
the module-scoped ``pipeline`` fixture started the gateway, ingestion and the grpc.aio
channel on. One loop and no thread: grpc.aio objects belong to the loop that created them.

The oracle is the validator the gateway uses (``reading_from_proto`` with its limits),
evaluated with the clock read before and after each call, so a timestamp that crosses the
"not far in the future" bound during the call may go either way. Independent invariants
(finite kWh >= 0, a non-empty printable ASCII device_id, a proto-valid timestamp from
2000 on, the derived reading_id) are checked on every accepted reading without the model.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aio_pika
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import event, given, settings
from hypothesis import strategies as st

from api_gateway.app import SERVICE_NAME
from common.convert import reading_from_proto
from common.energy.v1 import gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.messages import BATCH_SCHEMA_VERSION, decode
from common.models import (
    EARLIEST_TIMESTAMP,
    ID_PATTERN,
    InvalidReading,
    Limits,
    Reading,
    derive_reading_id,
)
from common.rabbit import Topology
from tests.component.test_ingestion import start_pipeline
from tests.conftest import ADMIN_METADATA, RABBITMQ_URL, delete_topology

pytestmark = pytest.mark.component

METADATA = ADMIN_METADATA  # may send for any device; only the global bucket applies
FIELDS = {"reading", "device_id", "reading_id", "timestamp", "usage_kwh"}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
MAX_NANOS = 999_999_999
CALL_TIMEOUT_S = 20


@dataclass(frozen=True)
class Fields:
    """One generated request: plain values, so a failing example prints readably."""

    present: bool
    device_id: str
    timestamp: tuple[int, int] | None  # (seconds, nanos); None leaves the field unset
    usage_kwh: float
    reading_id: str


@dataclass
class Pipeline:
    stub: gateway_pb2_grpc.GatewayStub
    channel: grpc.aio.Channel
    limits: Limits
    billing_queue: aio_pika.abc.AbstractQueue

    async def take_queued(self) -> list[Reading]:
        """Everything in the billing queue now, decoded (and so re-validated) as billing
        would; the queue is empty afterwards. A confirmed publish is already in the queue,
        so what an answered call published is all here."""
        readings = []
        now = datetime.now(UTC)
        while (message := await self.billing_queue.get(no_ack=True, fail=False)) is not None:
            decoded = decode(message.body, now=now, limits=self.limits)
            assert decoded.invalid == [], decoded.invalid  # the gateway let one through
            body = json.loads(message.body)
            if body["schema_version"] == BATCH_SCHEMA_VERSION:
                assert message.message_id == body["batch_id"]
            else:
                assert [message.message_id] == [r.reading_id for r in decoded.readings]
            for reading in decoded.readings:
                assert math.isfinite(reading.usage_kwh) and reading.usage_kwh >= 0, reading
            readings += decoded.readings
        return readings

    async def check_queued_exactly(self, accepted: Sequence[Reading]) -> None:
        """The queue holds exactly ``accepted`` (as many copies of each as were sent)."""
        queued = await self.take_queued()
        assert Counter(queued) == Counter(accepted), (
            f"queued {len(queued)}, accepted {len(accepted)}: "
            f"not accepted {list((Counter(queued) - Counter(accepted)).elements())[:3]}, "
            f"missing {list((Counter(accepted) - Counter(queued)).elements())[:3]}"
        )


@pytest.fixture(scope="module")
async def pipeline() -> AsyncIterator[Pipeline]:
    """Gateway and ingestion once for the module, on a topology of the module's own."""
    prefix = f"t{uuid.uuid4().hex[:10]}-"
    ingestion, gateway = await start_pipeline(prefix)
    try:
        await ingestion.publisher._connecting  # connected before the first RPC
        broker = await aio_pika.connect(RABBITMQ_URL)
        async with broker, grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            amqp = await broker.channel()
            queue = await amqp.declare_queue(Topology(prefix).billing_queue, passive=True)
            yield Pipeline(
                gateway_pb2_grpc.GatewayStub(channel), channel, gateway.settings.limits, queue
            )
    finally:
        await gateway.stop()
        await ingestion.stop()
        await delete_topology(prefix)


# --- strategies -------------------------------------------------------------------------

valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)
# Anything UTF-8 can carry (proto strings must be UTF-8, so no lone surrogates).
any_char = st.characters(exclude_categories=["Cs"])
weird_ids = st.sampled_from(
    [
        " meter-1",
        "meter-1 ",
        "meter 1",
        "\tmeter-1",
        "meter-1\n",
        "meter\x00",
        "meter\x7f",
        "-meter",
        ".meter",
        "_",
        "meter/1",
        "ｍeter",  # fullwidth m
        "meter\u200b",  # zero-width space
        "\u202emeter",  # right-to-left override
        "٣٤",  # Arabic-Indic digits
        "é",
        "💡",
        "a" * 128,
        "a" * 129,
    ]
)
long_strings = st.builds(
    lambda char, count: char * count, st.sampled_from("a-é💡\x00 "), st.integers(100, 10_000)
)
device_ids = st.one_of(
    valid_ids,
    st.just(""),
    weird_ids,
    st.text(st.characters(codec="ascii")),  # control characters included
    st.text(any_char),
    valid_ids.map(lambda s: f" {s}\n"),
    long_strings,
)
reading_ids = st.one_of(
    st.just(""),
    st.uuids().map(str),
    valid_ids,
    weird_ids,
    st.text(st.characters(codec="ascii")),
    st.text(any_char),
    long_strings,
)
EARLIEST_S = int(EARLIEST_TIMESTAMP.timestamp())
seconds = st.one_of(
    st.integers(EARLIEST_S, int(time.time())),  # valid
    st.integers(*INT64),
    st.integers(EARLIEST_S - 5, EARLIEST_S + 5),
    # Around "now + max_future_skew" (15 min by default) when the example is drawn.
    st.integers(-10, 10).map(lambda d: int(time.time()) + 900 + d),
    st.sampled_from(
        [0, -1, *INT64, 2**31, -62_135_596_801, -62_135_596_800, 253_402_300_799, 253_402_300_800]
    ),
)
nanos = st.one_of(
    st.integers(0, MAX_NANOS),
    st.sampled_from([0, MAX_NANOS, MAX_NANOS + 1, -1, *INT32]),
    st.integers(*INT32),
)
timestamps = st.one_of(st.none(), st.tuples(seconds, nanos))
usages = st.one_of(
    st.floats(0, 1_000_000),  # valid
    st.floats(),  # nan, ±inf, -0.0, subnormals, huge
    st.sampled_from(
        [
            math.nan,
            -math.nan,
            math.inf,
            -math.inf,
            -0.0,
            5e-324,
            -5e-324,
            2.2250738585072014e-308,
            1_000_000.0,
            math.nextafter(1_000_000.0, math.inf),
            1.7976931348623157e308,
            -1.0,
        ]
    ),
)
VALID = {
    "present": st.just(True),
    "device_id": valid_ids,
    "timestamp": st.tuples(st.integers(EARLIEST_S, int(time.time())), st.integers(0, MAX_NANOS)),
    "usage_kwh": st.floats(0, 1_000_000),
    "reading_id": st.one_of(st.just(""), st.uuids().map(str), valid_ids),
}


def requests_with(**fuzzed: st.SearchStrategy) -> st.SearchStrategy[Fields]:
    """Requests whose ``fuzzed`` fields come from the given strategies, the others valid."""
    return st.builds(Fields, **(VALID | fuzzed))


# Valid ones, one field fuzzed at a time (no other error masks it), and all fields fuzzed.
requests = st.one_of(
    requests_with(),
    requests_with(device_id=device_ids),
    requests_with(timestamp=timestamps),
    requests_with(usage_kwh=usages),
    requests_with(reading_id=reading_ids),
    requests_with(
        present=st.integers(0, 9).map(lambda n: n != 9),  # a missing reading now and then
        device_id=device_ids,
        timestamp=timestamps,
        usage_kwh=usages,
        reading_id=reading_ids,
    ),
)


# --- oracle and invariants --------------------------------------------------------------


def to_request(fields: Fields) -> gateway_pb2.SendReadingRequest:
    """Set the fields on the proto directly: out-of-range timestamps must reach the server."""
    if not fields.present:
        return gateway_pb2.SendReadingRequest()
    reading = reading_pb2.Reading(
        device_id=fields.device_id, usage_kwh=fields.usage_kwh, reading_id=fields.reading_id
    )
    if fields.timestamp is not None:
        reading.timestamp.seconds, reading.timestamp.nanos = fields.timestamp
    return gateway_pb2.SendReadingRequest(reading=reading)


def verdict(
    request: gateway_pb2.SendReadingRequest, now: datetime, limits: Limits
) -> Reading | InvalidReading:
    """What the gateway's validator says at ``now``."""
    if not request.HasField("reading"):
        return InvalidReading("reading", "is missing")
    try:
        return reading_from_proto(request.reading, now=now, limits=limits)
    except InvalidReading as error:
        return error


def verdicts(
    request: gateway_pb2.SendReadingRequest, before: datetime, after: datetime, limits: Limits
) -> list[Reading | InvalidReading]:
    return [verdict(request, now, limits) for now in (before, after)]


def accepted_reading(
    request: gateway_pb2.SendReadingRequest, options: Sequence[Reading | InvalidReading]
) -> Reading:
    """The validated reading the gateway accepted; fail if the oracle rejects it at both times."""
    valid = [option for option in options if isinstance(option, Reading)]
    assert valid, f"accepted although invalid: {[str(o) for o in options]}; {request}"
    return valid[0]


def check_rejection(
    message: str,
    request: gateway_pb2.SendReadingRequest,
    options: Sequence[Reading | InvalidReading],
) -> None:
    """A rejection the oracle agrees with, whose message names the field in plain words."""
    errors = [option for option in options if isinstance(option, InvalidReading)]
    assert errors, f"rejected although valid: {message!r}; {request}"
    name, _, text = message.partition(": ")
    assert name in FIELDS and text.strip(), f"message does not name a field: {message!r}"
    assert name in {error.field for error in errors}, (message, [str(e) for e in errors])
    # User input is quoted with repr(): no raw control characters, no megabytes echoed.
    assert message.isprintable() and len(message) <= 1024, message
    if name in {"device_id", "reading_id", "usage_kwh"}:  # timestamp ones quote the clock
        assert message in {str(error) for error in errors}, (message, [str(e) for e in errors])


def check_independently(request: gateway_pb2.SendReadingRequest, reading: Reading) -> None:
    """Invariants of an accepted reading checked on the proto, without the model."""
    message = request.reading
    assert math.isfinite(message.usage_kwh) and message.usage_kwh >= 0, message.usage_kwh
    device_id = message.device_id
    assert device_id and device_id.isascii() and device_id.isprintable(), repr(device_id)
    assert " " not in device_id and len(device_id) <= 128, repr(device_id)
    assert message.HasField("timestamp")
    seconds, nanos = message.timestamp.seconds, message.timestamp.nanos
    assert 0 <= nanos <= MAX_NANOS, nanos
    instant = EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    assert instant >= datetime(2000, 1, 1, tzinfo=UTC), instant
    expected_id = message.reading_id or derive_reading_id(device_id, instant)
    assert reading == Reading(device_id, instant, message.usage_kwh, expected_id)


def refusal_of(error: grpc.aio.AioRpcError) -> str:
    """The message of an INVALID_ARGUMENT; any other status fails the example."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    return error.details() or ""


# --- tests ------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(fields=requests)
async def test_send_reading_answers_ok_or_invalid_argument(
    pipeline: Pipeline, fields: Fields
) -> None:
    request = to_request(fields)
    before = datetime.now(UTC)
    try:
        response = await pipeline.stub.SendReading(
            request, metadata=METADATA, timeout=CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as error:
        event(error.code().name)  # pytest --hypothesis-show-statistics lists them
        options = verdicts(request, before, datetime.now(UTC), pipeline.limits)
        check_rejection(refusal_of(error), request, options)
        await pipeline.check_queued_exactly([])
        return
    event("OK")
    options = verdicts(request, before, datetime.now(UTC), pipeline.limits)
    reading = accepted_reading(request, options)
    check_independently(request, reading)
    assert response.reading_id == reading.reading_id
    await pipeline.check_queued_exactly([reading])


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(requests, max_size=20))
async def test_send_readings_accepts_exactly_the_valid_readings(
    pipeline: Pipeline, batch: list[Fields]
) -> None:
    sent = [to_request(fields) for fields in batch]

    async def stream() -> AsyncIterator[gateway_pb2.SendReadingRequest]:
        for request in sent:
            yield request

    before = datetime.now(UTC)
    response = await pipeline.stub.SendReadings(stream(), metadata=METADATA, timeout=CALL_TIMEOUT_S)
    after = datetime.now(UTC)
    share = "all" if response.accepted == len(sent) else "some" if response.accepted else "none"
    event(f"{share} of the stream accepted")
    indices = [rejection.index for rejection in response.rejected]
    assert indices == sorted(set(indices)), indices
    assert response.rejected_count == len(indices)  # at most 20, all listed
    assert response.accepted + response.rejected_count == len(sent)
    rejected = {rejection.index: rejection for rejection in response.rejected}
    accepted = []
    for index, request in enumerate(sent):
        options = verdicts(request, before, after, pipeline.limits)
        if index in rejected:
            check_rejection(rejected[index].reason, request, options)
            assert rejected[index].device_id == request.reading.device_id[:128]
        else:
            reading = accepted_reading(request, options)
            check_independently(request, reading)
            accepted.append(reading)
    await pipeline.check_queued_exactly(accepted)


# Inputs a person would call hostile, each with the field its refusal must name.
HOSTILE = [
    (Fields(False, "", None, 0.0, ""), "reading"),
    (Fields(True, "", (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "meter 1", (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "meter\x00", (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "\u202emeter", (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "💡" * 10_000, (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "a" * 129, (1_700_000_000, 0), 1.0, ""), "device_id"),
    (Fields(True, "meter-1", (1_700_000_000, 0), 1.0, "id with space"), "reading_id"),
    (Fields(True, "meter-1", None, 1.0, ""), "timestamp"),
    (Fields(True, "meter-1", (INT64[1], 0), 1.0, ""), "timestamp"),
    (Fields(True, "meter-1", (1_700_000_000, -1), 1.0, ""), "timestamp"),
    (Fields(True, "meter-1", (0, 0), 1.0, ""), "timestamp"),  # 1970
    (Fields(True, "meter-1", (1_700_000_000, 0), math.nan, ""), "usage_kwh"),
    (Fields(True, "meter-1", (1_700_000_000, 0), math.inf, ""), "usage_kwh"),
    (Fields(True, "meter-1", (1_700_000_000, 0), -1.0, ""), "usage_kwh"),
    (Fields(True, "meter-1", (1_700_000_000, 0), 1.7976931348623157e308, ""), "usage_kwh"),
]


async def test_hostile_input_is_refused_by_field_and_only_valid_readings_are_queued(
    pipeline: Pipeline,
) -> None:
    """Fixed examples, not drawn: alone or after the fuzz, the gateway names each bad field,
    queues nothing for them, keeps serving, and queues a valid reading sent after them."""
    await pipeline.take_queued()  # whatever an earlier test left; this test starts empty
    limits = pipeline.limits
    for fields, field_name in HOSTILE:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pipeline.stub.SendReading(
                to_request(fields), metadata=METADATA, timeout=CALL_TIMEOUT_S
            )
        message = refusal_of(caught.value)
        assert message.startswith(f"{field_name}: "), (fields, message)
        now = datetime.now(UTC)
        check_rejection(message, to_request(fields), [verdict(to_request(fields), now, limits)])

    async def stream() -> AsyncIterator[gateway_pb2.SendReadingRequest]:
        for fields, _ in HOSTILE:
            yield to_request(fields)

    response = await pipeline.stub.SendReadings(stream(), metadata=METADATA, timeout=CALL_TIMEOUT_S)
    assert response.accepted == 0 and response.rejected_count == len(HOSTILE)
    reasons = [rejection.reason.partition(": ")[0] for rejection in response.rejected]
    assert reasons == [field_name for _, field_name in HOSTILE]
    await pipeline.check_queued_exactly([])

    health = await health_pb2_grpc.HealthStub(pipeline.channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=CALL_TIMEOUT_S
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    canary = to_request(Fields(True, "meter-1", (int(at.timestamp()), 0), 1.5, ""))
    response = await pipeline.stub.SendReading(canary, metadata=METADATA, timeout=CALL_TIMEOUT_S)
    expected = Reading("meter-1", at, 1.5, derive_reading_id("meter-1", at))
    assert response.reading_id == expected.reading_id
    await pipeline.check_queued_exactly([expected])
