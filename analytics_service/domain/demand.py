"""The fleet's peak demand of the current UTC month, in 15-minute slots. Pure: clock injected.

The fleet's demand in a slot is the energy of every reading whose metering interval ends
in that slot, summed over all devices, times 4: kWh per 15 minutes is the average kW over
them. Slots are billing's, from ``common.slots``: the 15-minute UTC
grid, a slot (start, start + 15 min] holding the readings that end in it, so a reading
ending at 12:15:00 belongs to the slot that starts at 12:00. The peak is the highest slot of
the current UTC calendar month (billing's per-tariff months are local ones); of slots with
the same energy, the earliest.

Memory is one integer of milliwatt-hours per slot of the current month (at most 31 * 96);
the month before is dropped when the clock enters a new one. Readings whose slot is not in
the current month are ignored. Deduplication is the caller's: add only readings the
``Tally`` counted as new.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from common.models import MILLIWH_PER_KWH, Reading
from common.slots import EPOCH, SLOT, slot_index

SLOT_S = 900
SLOTS_PER_HOUR = 4  # kWh in a 15-minute slot, times this, is its average kW


@dataclass(frozen=True)
class Peak:
    """The highest slot so far: its average power and the unix time its slot starts.

    ``kw == 0`` and ``slot_start_s == 0`` before the first energy of the month.
    """

    kw: float
    slot_start_s: int


def month_slots(unix_s: float) -> tuple[int, int]:
    """First slot of the UTC month holding ``unix_s``, and the first slot of the next one."""
    now = datetime.fromtimestamp(unix_s, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    after = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return (start - EPOCH) // SLOT, (after - EPOCH) // SLOT


class FleetDemand:
    """Milliwatt-hours per 15-minute slot of the current UTC month, summed over devices.

    Thread-safe: the consumer adds on the event loop while prometheus_client's HTTP thread
    reads the peak.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock  # wall clock, unix seconds: which month is current
        self._lock = threading.Lock()
        self._first = self._end = 0
        self._milliwh: list[int] = []
        self._peak_milliwh = 0
        self._peak_index = -1
        self._turn_month()

    def add_batch(self, readings: Iterable[Reading]) -> int:
        """Add new readings' energy to their slots; return how many fell in this month."""
        # Readings of a batch mostly end at the same instants (loggers meter aligned
        # intervals), and slot_index is most of the cost of a reading: once per instant.
        slots: dict[datetime, int] = {}
        added = 0
        with self._lock:
            for reading in readings:
                slot = slots.get(reading.timestamp)
                if slot is None:
                    slot = slots[reading.timestamp] = slot_index(reading.timestamp)
                if slot >= self._end:
                    # Ask the clock only then: a reading of a later month means the month
                    # may have turned (or the logger's clock is ahead).
                    self._turn_month()
                index = slot - self._first
                if not 0 <= index < len(self._milliwh):
                    continue
                total = self._milliwh[index] + reading.usage_milliwh
                self._milliwh[index] = total
                # Slots only grow (energy is never negative), so the peak can follow each
                # add; a tie goes to the earlier slot, whatever the order the readings came in.
                if total > self._peak_milliwh or (
                    total == self._peak_milliwh and index < self._peak_index
                ):
                    self._peak_milliwh, self._peak_index = total, index
                added += 1
        return added

    def peak(self) -> Peak:
        """The highest slot of the current month so far (zeros before any energy)."""
        with self._lock:
            self._turn_month()
            if self._peak_index < 0:
                return Peak(0.0, 0)
            return Peak(
                self._peak_milliwh * SLOTS_PER_HOUR / MILLIWH_PER_KWH,
                (self._first + self._peak_index) * SLOT_S,
            )

    def _turn_month(self) -> None:
        """Start the clock's month afresh when it is not the one held (at start too)."""
        first, end = month_slots(self._clock())
        if first == self._first:
            return
        self._first, self._end = first, end
        self._milliwh = [0] * (end - first)
        self._peak_milliwh, self._peak_index = 0, -1
