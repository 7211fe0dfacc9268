"""The 15-minute UTC slots that billing bills and analytics sums demand in: one grid.

A reading's ``usage_kwh`` is the energy of the interval that *ends* at its timestamp, so it
belongs to the slot holding the instant just before it: a slot (start, start + 15 min]
holds the readings that end in it, and a reading stamped 07:00:00 is energy used before
07:00. Every time zone offset and time-of-use band boundary is a multiple of 15 minutes,
so each slot lies in one band and one local billing month, whatever the tariff.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

SLOT = timedelta(minutes=15)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)


def slot_start(timestamp: datetime) -> datetime:
    """Start of the 15-minute UTC slot whose interval (start, start + 15 min] holds it."""
    before = timestamp.astimezone(UTC) - _TICK
    return before - (before - EPOCH) % SLOT


def slot_index(timestamp: datetime) -> int:
    """Number, since the epoch, of the slot ``slot_start`` gives, without building a
    datetime (analytics adds one per reading)."""
    return (timestamp - EPOCH - _TICK) // SLOT
