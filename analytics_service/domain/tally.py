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
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

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
        self._seen: TTLCache[str, bool] = TTLCache(
            maxsize=max_remembered, ttl=windows.dedupe_s, timer=clock
        )
        self._last_seen: dict[str, float] = {}
        self._energy: dict[str, deque[tuple[int, float]]] = defaultdict(deque)
        self._lock = threading.Lock()

    def record(self, reading: Reading) -> bool:
        """Return True if the reading is new (count it), False for a repeat."""
        with self._lock:
            if reading.reading_id in self._seen:
                return False
            self._seen[reading.reading_id] = True
            now = self._clock()
            self._last_seen[reading.device_id] = now
            minutes = self._energy[reading.device_id]
            minute = int(now // 60)
            if minutes and minutes[-1][0] == minute:
                minutes[-1] = (minute, minutes[-1][1] + reading.usage_kwh)
            else:
                minutes.append((minute, reading.usage_kwh))
            return True

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
