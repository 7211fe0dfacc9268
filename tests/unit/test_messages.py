"""The broker message: encoding round trip and every way a body can be poison."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from common.messages import PoisonMessage, decode_reading, encode_reading
from common.models import validate_reading

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
READING = validate_reading(
    "meter-1", datetime(2026, 11, 22, 11, 0, 0, 123456, tzinfo=UTC), 0.125, now=NOW
)


def test_round_trip_is_exact() -> None:
    assert decode_reading(encode_reading(READING), now=NOW) == READING


def test_body_is_readable_json_with_a_schema_version() -> None:
    body = json.loads(encode_reading(READING))
    assert body == {
        "schema_version": 1,
        "reading_id": READING.reading_id,
        "device_id": "meter-1",
        "timestamp": "2026-11-22T11:00:00.123456+00:00",
        "usage_kwh": 0.125,
    }


def body(**changes: object) -> bytes:
    data = json.loads(encode_reading(READING))
    data.update(changes)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (body(schema_version=2), "unsupported schema_version 2"),
        (body(schema_version=...), "unsupported schema_version None"),
        (body(device_id=...), "'device_id' is missing"),
        (body(usage_kwh="1.5"), "'usage_kwh' is missing or has the wrong type"),
        (body(usage_kwh=True), "'usage_kwh'"),
        (body(reading_id=""), "'reading_id' is empty"),
        (body(timestamp="yesterday"), "not ISO-8601"),
        (body(usage_kwh=-1), "cannot be negative"),
        (body(device_id="a b"), "device_id"),
        (
            b'{"schema_version":1,"reading_id":"r","device_id":"d","timestamp":"2026-11-22T11:00:00Z",'
            b'"usage_kwh":NaN}',
            "finite",
        ),
    ],
)
def test_poison_bodies_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessage) as caught:
        decode_reading(raw, now=NOW)
    assert reason in str(caught.value)
