"""Per-device, per-day energy buckets: the unit of idempotent billing.

A reading belongs to the UTC day of its timestamp. Each (device, day) bucket records the
reading ids it holds, so adding a reading is one atomic conditional update that does
nothing the second time. Energy is kept as integer milliwatt-hours so totals are exact
and the same in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.models import MILLIWH_PER_KWH, Reading


class TransientFailure(Exception):
    """A store is unreachable or timed out: retry later, the reading must not be lost."""


@dataclass(frozen=True)
class DayKey:
    device_id: str
    day: str  # YYYY-MM-DD, UTC

    @property
    def bucket_id(self) -> str:
        return f"{self.device_id}|{self.day}"

    @property
    def month(self) -> str:
        return self.day[:7]

    @classmethod
    def of(cls, reading: Reading) -> DayKey:
        return cls(reading.device_id, reading.timestamp.strftime("%Y-%m-%d"))


@dataclass(frozen=True)
class DayTotal:
    """A bucket's state. ``count`` only grows, so it orders snapshots of the same bucket."""

    count: int = 0
    usage_milliwh: int = 0


@dataclass(frozen=True)
class Recorded:
    """The outcome of recording a reading: its bucket after the write, and whether it was new."""

    total: DayTotal
    duplicate: bool


def to_kwh(milliwh: int) -> float:
    return milliwh / MILLIWH_PER_KWH


class Ledger(Protocol):
    """The source of truth (MongoDB)."""

    async def record(self, reading: Reading) -> Recorded:
        """Store the reading once; return its day bucket's total after the write."""
        ...

    async def day_total(self, key: DayKey) -> DayTotal: ...

    async def latest(self, device_id: str) -> Reading | None: ...


class Cache(Protocol):
    """The derivable copy (Redis)."""

    async def put_day_total(self, key: DayKey, total: DayTotal) -> None: ...

    async def put_latest(self, reading: Reading) -> None: ...
