"""Counting readings once and the devices seen recently. Pure: the clock is injected."""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from common.models import Reading


class Tally:
    """Deduplicates redelivered or resent readings inside a window and tracks active devices.

    Memory is bounded: at most ``max_remembered`` reading ids, and one entry per device
    seen within ``active_window_s``.
    """

    def __init__(
        self,
        dedupe_window_s: float,
        max_remembered: int,
        active_window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._seen: TTLCache[str, bool] = TTLCache(
            maxsize=max_remembered, ttl=dedupe_window_s, timer=clock
        )
        self._active_window_s = active_window_s
        self._last_seen: dict[str, float] = {}

    def record(self, reading: Reading) -> bool:
        """Return True if the reading is new (count it), False for a repeat."""
        if reading.reading_id in self._seen:
            return False
        self._seen[reading.reading_id] = True
        self._last_seen[reading.device_id] = self._clock()
        return True

    def active_devices(self) -> int:
        """Devices with a reading processed within the active window; forgets older ones."""
        horizon = self._clock() - self._active_window_s
        for device_id in [d for d, seen in self._last_seen.items() if seen < horizon]:
            del self._last_seen[device_id]
        return len(self._last_seen)
