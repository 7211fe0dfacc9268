"""Per-device, 15-minute energy slots: the unit of idempotent billing.

A reading's ``usage_kwh`` is the energy of the interval that *ends* at its timestamp, so
it belongs to the slot holding the instant just before it: a reading stamped 07:00:00 is
energy used before 07:00. Slots are 15 minutes of UTC; every time zone offset and every
time-of-use band boundary is a multiple of 15 minutes, so each slot lies in exactly one
band and one local billing month, whatever the tariff.

Each (device, slot) bucket maps the reading ids it holds to their energy, so adding a
reading sets one key: a repeat sets the same value and adds nothing, whatever the order or
the number of writers. Energy is kept as integer milliwatt-hours so totals are exact and
the same in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Protocol

from common.models import MILLIWH_PER_KWH, Reading
from common.slots import slot_start


class TransientFailure(Exception):
    """A store is unreachable or timed out: retry later, the reading must not be lost."""


@dataclass(frozen=True)
class SlotKey:
    device_id: str
    start: datetime  # UTC, a multiple of 15 minutes

    @cached_property  # used several times per bucket and batch: format it once
    def bucket_id(self) -> str:
        return f"{self.device_id}|{self.start.strftime('%Y-%m-%dT%H:%M')}"

    @property
    def month(self) -> str:
        """The slot's UTC month, YYYY-MM: the Redis hash it is cached in."""
        return self.start.strftime("%Y-%m")

    @property
    def field(self) -> str:
        """DDHHMM: the slot's field in its month's Redis hash."""
        return self.start.strftime("%d%H%M")

    @classmethod
    def of(cls, reading: Reading) -> SlotKey:
        return cls(reading.device_id, slot_start(reading.timestamp))


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
class BatchRecorded:
    """The outcome of recording a batch of readings.

    ``slots``: every slot the batch touched (also those where every reading was a
    duplicate, so a redelivery heals a cache that missed the first write). ``new``: the
    readings billed now, each once. ``duplicates``: the other readings of the batch,
    already billed before or repeated within it.
    """

    slots: frozenset[SlotKey]
    new: list[Reading]
    duplicates: int


class Ledger(Protocol):
    """The source of truth (MongoDB)."""

    async def record_batch(self, readings: Sequence[Reading]) -> BatchRecorded:
        """Store each reading once, whatever the batch repeats or earlier batches held."""
        ...

    async def latest(self, device_id: str) -> Reading | None: ...


class Cache(Protocol):
    """The derivable copy (Redis)."""

    async def put_latest(self, reading: Reading) -> None: ...

    async def mark_changed(self, slots: Iterable[SlotKey], latest: Iterable[Reading]) -> None:
        """Slots whose cached totals are now behind MongoDB (readers refresh them), and
        each device's latest reading, in one round trip."""
        ...
