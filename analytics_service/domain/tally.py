"""Counting readings once, and which devices are active, silent and top. Pure: clock injected.

Memory is bounded by the number of devices, never by readings: one last-seen time per
device seen within the silence horizon, one kWh counter per device per minute of the top
window, and at most ``max_remembered`` reading ids for deduplication.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common.models import Reading


@dataclass(frozen=True)
class Windows:
    active_s: float = 900.0  # a device is active this long after a reading
    silent_after_s: float = 3600.0  # ... and silent after this long without one
    forget_after_s: float = 86400.0  # ... and forgotten (neither) after this long
    top_s: float = 3600.0  # top consumers rank the energy of this window
    dedupe_s: float = 3600.0  # a resent reading within this window counts once


class Tally:
    """Deduplicates readings and keeps the per-device state the business metrics need.

    Thread-safe: the consumer records on the event loop while prometheus_client's HTTP
    thread reads the gauges, and iterating a dict that the other thread changes fails.
    """

    def __init__(
        self,
        windows: Windows,
        max_remembered: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._windows = windows
        self._clock = clock
        self._max_remembered = max_remembered
        self._seen: dict[str, float] = {}  # reading_id -> when first seen
        # The same ids, oldest first. Not the dict's own order: deleting a dict's first key
        # leaves a hole that every later search for the first key steps over, so a full
        # dict dropping its oldest id for each new one would cost O(max_remembered) per id.
        self._oldest_first: deque[str] = deque()
        self._last_seen: dict[str, float] = {}
        self._energy: dict[str, deque[tuple[int, float]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def record_batch(self, readings: Iterable[Reading]) -> list[Reading]:
        """Count the readings not seen before; return them, in order (repeats left out).

        One lock and one clock reading for the whole batch: its readings arrived together.
        """
        with self._lock:
            now = self._clock()
            seen, oldest_first = self._seen, self._oldest_first
            horizon = now - self._windows.dedupe_s
            while oldest_first and seen[oldest_first[0]] <= horizon:
                del seen[oldest_first.popleft()]
            minute = int(now // 60)
            new = []
            for reading in readings:
                if reading.reading_id in seen:
                    continue
                seen[reading.reading_id] = now
                oldest_first.append(reading.reading_id)
                if len(oldest_first) > self._max_remembered:
                    del seen[oldest_first.popleft()]
                new.append(reading)
                self._last_seen[reading.device_id] = now
                minutes = self._energy[reading.device_id]
                if minutes and minutes[-1][0] == minute:
                    minutes[-1] = (minute, minutes[-1][1] + reading.usage_kwh)
                else:
                    minutes.append((minute, reading.usage_kwh))
            return new

    def restore(self, device_id: str, seconds_ago: float) -> None:
        """Seed a device's last-seen time (at start, from the latest readings billing keeps)."""
        with self._lock:
            if seconds_ago < self._windows.forget_after_s:
                self._last_seen.setdefault(device_id, self._clock() - max(seconds_ago, 0.0))

    def active_devices(self) -> list[str]:
        """Devices with a reading within the active window."""
        with self._lock:
            self._forget()
            horizon = self._clock() - self._windows.active_s
            return [device for device, seen in self._last_seen.items() if seen >= horizon]

    def silent_devices(self) -> int:
        """Devices that sent within the forget horizon but nothing for silent_after_s."""
        with self._lock:
            self._forget()
            horizon = self._clock() - self._windows.silent_after_s
            return sum(1 for seen in self._last_seen.values() if seen < horizon)

    def top_consumers(self, n: int) -> list[tuple[str, float]]:
        """The ``n`` devices with the most kWh within the top window, largest first."""
        with self._lock:
            oldest = int((self._clock() - self._windows.top_s) // 60)
            totals = {}
            for device, minutes in list(self._energy.items()):
                while minutes and minutes[0][0] <= oldest:
                    minutes.popleft()
                if minutes:
                    totals[device] = sum(kwh for _, kwh in minutes)
                else:
                    del self._energy[device]
            return heapq.nlargest(n, totals.items(), key=lambda item: (item[1], item[0]))

    def _forget(self) -> None:
        horizon = self._clock() - self._windows.forget_after_s
        for device in [d for d, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[device]
