"""Proto ⇄ domain conversion of readings, shared by the gateway and ingestion."""

from __future__ import annotations

from datetime import UTC, datetime

from common.energy.v1 import reading_pb2
from common.models import InvalidReading, Limits, Reading, validate_reading


def reading_from_proto(message: reading_pb2.Reading, *, now: datetime, limits: Limits) -> Reading:
    """Validate a proto Reading; raise InvalidReading with an actionable message."""
    timestamp = None
    if message.HasField("timestamp"):
        try:
            timestamp = message.timestamp.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            raise InvalidReading(
                "timestamp",
                f"seconds={message.timestamp.seconds} nanos={message.timestamp.nanos} is not a "
                "valid instant; send the end of the interval as a UTC timestamp",
            ) from None
    return validate_reading(
        message.device_id,
        timestamp,
        message.usage_kwh,
        message.reading_id,
        now=now,
        limits=limits,
    )


def reading_to_proto(reading: Reading) -> reading_pb2.Reading:
    message = reading_pb2.Reading(
        device_id=reading.device_id,
        usage_kwh=reading.usage_kwh,
        reading_id=reading.reading_id,
    )
    message.timestamp.FromDatetime(reading.timestamp)
    return message
