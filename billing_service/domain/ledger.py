"""Per-device, per-hour energy buckets: the unit of idempotent billing.

A reading belongs to the UTC hour of its timestamp. Each (device, hour) bucket records the
reading ids it holds, so adding a reading is one atomic conditional update that does
nothing the second time. Hourly buckets keep that id list short (60 at one reading a
minute) and are what time-of-use prices are computed from. Energy is kept as integer
milliwatt-hours so totals are exact and the same in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.models import MILLIWH_PER_KWH, Reading


class TransientFailure(Exception):
    """A store is unreachable or timed out: retry later, the reading must not be lost."""


@dataclass(frozen=True)
class HourKey:
    device_id: str
    hour: str  # YYYY-MM-DDTHH, UTC

    @property
    def bucket_id(self) -> str:
        return f"{self.device_id}|{self.hour}"

    @property
    def month(self) -> str:
        return self.hour[:7]

    @property
    def hour_of_month(self) -> str:
        """DDHH: the bucket's field in the month's Redis hash."""
        return self.hour[8:10] + self.hour[11:13]

    @classmethod
    def of(cls, reading: Reading) -> HourKey:
        return cls(reading.device_id, reading.timestamp.strftime("%Y-%m-%dT%H"))


@dataclass(frozen=True)
class Total:
    """A bucket's state or a sum of them. ``count`` only grows, so it orders snapshots."""

    count: int = 0
    usage_milliwh: int = 0

    def __add__(self, other: Total) -> Total:
        return Total(self.count + other.count, self.usage_milliwh + other.usage_milliwh)

    @property
    def usage_kwh(self) -> float:
        return self.usage_milliwh / MILLIWH_PER_KWH


@dataclass(frozen=True)
class Recorded:
    """The outcome of recording a reading: its bucket after the write, and whether it was new."""

    total: Total
    duplicate: bool


class Ledger(Protocol):
    """The source of truth (MongoDB)."""

    async def record(self, reading: Reading) -> Recorded:
        """Store the reading once; return its hour bucket's total after the write."""
        ...

    async def hour_total(self, key: HourKey) -> Total: ...

    async def latest(self, device_id: str) -> Reading | None: ...


class Cache(Protocol):
    """The derivable copy (Redis)."""

    async def put_hour_total(self, key: HourKey, total: Total) -> None: ...

    async def put_latest(self, reading: Reading) -> None: ...
