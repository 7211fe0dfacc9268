"""Turns each reading into business metrics; no label per device."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from analytics_service.domain.tally import Tally
from common.models import Reading

READINGS = Counter("energy_readings_total", "Distinct readings received.")
DUPLICATES = Counter("energy_duplicate_readings_total", "Readings received again and not counted.")
ENERGY = Counter("energy_received_kwh_total", "Energy in the distinct readings received, kWh.")
ACTIVE_DEVICES = Gauge("energy_active_devices", "Devices with a reading in the active window.")


class AnalyticsHandler:
    """Counts a reading once, however often the broker or the logger delivers it."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally
        ACTIVE_DEVICES.set_function(tally.active_devices)

    async def __call__(self, reading: Reading) -> None:
        if self._tally.record(reading):
            READINGS.inc()
            ENERGY.inc(reading.usage_kwh)
        else:
            DUPLICATES.inc()
