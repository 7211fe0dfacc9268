"""The Reading model and its validation, shared by the gateway, ingestion and billing.

Pure domain code: no I/O. Every rejection is an ``InvalidReading`` naming the field and
saying what a person must change.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ : - starting with a letter or digit"
# Namespace for reading ids derived from device_id + timestamp (uuid5): fixed forever,
# or resent readings would stop deduplicating.
READING_ID_NAMESPACE = uuid.UUID("6f1c1a52-8d0e-4c47-9a53-3f0c2b7d9e41")
_NAMESPACE_BYTES = READING_ID_NAMESPACE.bytes
# The 128-bit id's version nibble (5: name-based, SHA-1) and variant bits (RFC 4122).
_VERSION_VARIANT_CLEAR = ~((0xF << 76) | (0x3 << 62))
_VERSION_5_VARIANT = (0x5 << 76) | (0x2 << 62)
MILLIWH_PER_KWH = 1_000_000


class InvalidReading(ValueError):
    """A reading that must be rejected; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Bounds on what a reading may say. Defaults suit meters from households to large sites."""

    max_usage_kwh: float = 1_000_000.0
    max_future_skew: timedelta = timedelta(minutes=15)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Reading:
    """A validated reading: ``usage_kwh`` used in the interval that ends at ``timestamp``."""

    device_id: str
    timestamp: datetime
    usage_kwh: float
    reading_id: str = field(default="")

    @property
    def usage_milliwh(self) -> int:
        """Energy as integer milliwatt-hours, so that totals add up exactly in any order."""
        return round(self.usage_kwh * MILLIWH_PER_KWH)


def utc_isoformat(instant: datetime) -> str:
    """``instant`` in UTC as ISO-8601 with microseconds (``2026-11-22T11:00:00.000000+00:00``):
    the text of reading ids and of broker messages."""
    if instant.tzinfo is not UTC:
        instant = instant.astimezone(UTC)
    return _utc_isoformat(instant)


# A fleet's readings share their interval ends (loggers report on the minute or the quarter
# hour), and isoformat was a sixth of ingestion's CPU per reading: each instant's text is
# kept. Only instants in UTC are asked for, so equal keys (same instant) have one text.
@functools.lru_cache(maxsize=16_384)
def _utc_isoformat(instant: datetime) -> str:
    return instant.isoformat(timespec="microseconds")


def derive_reading_id(device_id: str, timestamp: datetime) -> str:
    """The deterministic idempotency key of a reading that came without one: the uuid5 of
    ``device_id|instant`` in READING_ID_NAMESPACE.

    Computed as ``uuid.uuid5`` does (RFC 4122: SHA-1 of namespace + name, version and
    variant bits set) without building UUID objects, which cost twice the hash itself, for
    every reading without an id, at the gateway.
    """
    digest = hashlib.sha1(
        _NAMESPACE_BYTES + f"{device_id}|{utc_isoformat(timestamp)}".encode()
    ).digest()
    hex_ = "%032x" % (int.from_bytes(digest[:16]) & _VERSION_VARIANT_CLEAR | _VERSION_5_VARIANT)
    return f"{hex_[:8]}-{hex_[8:12]}-{hex_[12:16]}-{hex_[16:20]}-{hex_[20:]}"


def validate_reading(
    device_id: str,
    timestamp: datetime | None,
    usage_kwh: float,
    reading_id: str = "",
    *,
    now: datetime,
    limits: Limits = DEFAULT_LIMITS,
) -> Reading:
    """Check every field and return a Reading with its reading_id set, or raise InvalidReading."""
    if not device_id:
        raise InvalidReading("device_id", f"is empty; give the logger's id ({ID_RULE})")
    if not ID_PATTERN.fullmatch(device_id):
        raise InvalidReading("device_id", f"{_show(device_id)} is not valid; use {ID_RULE}")
    if reading_id and not ID_PATTERN.fullmatch(reading_id):
        raise InvalidReading(
            "reading_id",
            f"{_show(reading_id)} is not valid; use {ID_RULE}, or leave it empty to derive it",
        )
    if timestamp is None:
        raise InvalidReading("timestamp", "is missing; set the end of the metering interval (UTC)")
    if timestamp.tzinfo is None:
        raise InvalidReading("timestamp", "has no time zone; send it in UTC")
    if timestamp < EARLIEST_TIMESTAMP:
        raise InvalidReading(
            "timestamp", f"{timestamp.isoformat()} is before 2000-01-01; check the logger's clock"
        )
    latest = now + limits.max_future_skew
    if timestamp > latest:
        raise InvalidReading(
            "timestamp",
            f"{timestamp.isoformat()} is more than {limits.max_future_skew.total_seconds():g} s "
            "ahead of the "
            f"server clock ({now.isoformat(timespec='seconds')}); check the logger's clock",
        )
    if not math.isfinite(usage_kwh):
        raise InvalidReading("usage_kwh", f"is {usage_kwh}; send a finite number of kWh")
    if usage_kwh < 0:
        raise InvalidReading(
            "usage_kwh", f"is {usage_kwh}; energy used in an interval cannot be negative"
        )
    if usage_kwh > limits.max_usage_kwh:
        raise InvalidReading(
            "usage_kwh",
            f"is {usage_kwh:g} kWh, above the limit of {limits.max_usage_kwh:g} kWh for one "
            "reading; check the unit (kWh, not Wh)",
        )
    if timestamp.tzinfo is not UTC:
        timestamp = timestamp.astimezone(UTC)
    # Positional: a frozen dataclass takes keywords at half the speed, once per reading.
    return Reading(
        device_id,
        timestamp,
        float(usage_kwh),
        reading_id or derive_reading_id(device_id, timestamp),
    )


def _show(value: str, limit: int = 40) -> str:
    """Quote a user-supplied value for an error message without echoing megabytes of it."""
    if len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)
