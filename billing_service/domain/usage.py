"""Usage over a time range, aggregated by window. Pure: no I/O.

Windows of 15m, 1h and 1d are summed from the stored 15-minute slots; 1m and 5m from the
raw readings. Either way a reading counts in the window in which its metering interval
ends (the slot rule of ``ledger.slot_start``), so the two paths agree where they overlap.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from common.slots import SLOT

WINDOWS = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
FROM_SLOTS = {"15m", "1h", "1d"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidQuery(ValueError):
    """A query argument a person must change; the text says how."""


@dataclass
class UsageBucket:
    start: datetime
    count: int = 0
    sum_milliwh: int = 0
    min_milliwh: int = 0
    max_milliwh: int = 0

    def add(self, count: int, milliwh: int, smallest: int, largest: int) -> None:
        if count == 0:
            return
        self.min_milliwh = smallest if self.count == 0 else min(self.min_milliwh, smallest)
        self.max_milliwh = largest if self.count == 0 else max(self.max_milliwh, largest)
        self.count += count
        self.sum_milliwh += milliwh


def time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidQuery(
            f"time_zone {name!r} is not an IANA time zone; use one like Europe/Berlin, or leave "
            "it empty for UTC"
        ) from None


def window_starts(
    start: datetime, end: datetime, window: str, zone: ZoneInfo, max_buckets: int
) -> list[datetime]:
    """The start of every window in [start, end); raise InvalidQuery with the fix."""
    if window not in WINDOWS:
        raise InvalidQuery(f"window {window!r} is not supported; use one of {', '.join(WINDOWS)}")
    if end <= start:
        raise InvalidQuery(f"end ({end.isoformat()}) must be after start ({start.isoformat()})")
    size = WINDOWS[window]
    estimate = int((end - start) / size)
    if estimate > max_buckets:
        larger = [
            f"{w} gives {int((end - start) / WINDOWS[w])}" for w in WINDOWS if WINDOWS[w] > size
        ]
        raise InvalidQuery(
            f"[start, end) holds {estimate} windows of {window}, more than the limit of "
            f"{max_buckets}; narrow the range or use a larger window ({'; '.join(larger)})"
        )
    for name, instant in (("start", start), ("end", end)):
        if not _on_boundary(instant, window, zone):
            raise InvalidQuery(
                f"{name} {instant.isoformat()} is not on a {window} boundary in {zone.key}; "
                f"use for example {_floor(instant, window, zone).isoformat()}"
            )
    if window not in ("1h", "1d"):
        return [start + i * size for i in range(int((end - start) / size))]
    starts, instant = [], start
    while instant < end:  # local hours and days: step by slots, keep the aligned ones
        if _on_boundary(instant, window, zone):
            starts.append(instant)
        instant += SLOT
    return starts


def _on_boundary(instant: datetime, window: str, zone: ZoneInfo) -> bool:
    if window in ("1h", "1d"):
        local = instant.astimezone(zone)
        aligned = (local.minute, local.second, local.microsecond) == (0, 0, 0)
        return aligned and (window == "1h" or local.hour == 0)
    return (instant - _EPOCH) % WINDOWS[window] == timedelta(0)


def _floor(instant: datetime, window: str, zone: ZoneInfo) -> datetime:
    if window in ("1h", "1d"):
        local = instant.astimezone(zone).replace(minute=0, second=0, microsecond=0)
        if window == "1d":
            local = local.replace(hour=0)
        return local.astimezone(UTC)
    return instant - (instant - _EPOCH) % WINDOWS[window]


def from_slots(
    starts: list[datetime], rows: Iterable[tuple[datetime, int, int, int, int]]
) -> list[UsageBucket]:
    """Sum slots (start, count, milliwh, min, max) into the windows beginning at ``starts``."""
    buckets = [UsageBucket(start) for start in starts]
    for slot, count, milliwh, smallest, largest in rows:
        index = bisect.bisect_right(starts, slot) - 1
        if index >= 0:
            buckets[index].add(count, milliwh, smallest, largest)
    return buckets


def from_readings(
    starts: list[datetime], readings: Iterable[tuple[datetime, int]]
) -> list[UsageBucket]:
    """Sum readings (timestamp, milliwh) into windows by the end of their interval."""
    buckets = [UsageBucket(start) for start in starts]
    for timestamp, milliwh in readings:
        index = bisect.bisect_left(starts, timestamp) - 1  # start < timestamp <= next start
        if index >= 0:
            buckets[index].add(1, milliwh, milliwh, milliwh)
    return buckets
