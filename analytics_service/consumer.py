"""Turns each reading into business metrics; no label grows with the number of devices.

The per-device views (active, silent, unregistered, top consumers) are computed from the
tally when Prometheus scrapes; only the top-N carries a device_id label, N series at most.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from analytics_service.domain.tally import Tally
from common.models import Reading

READINGS = Counter("energy_readings_total", "Distinct readings received.")
DUPLICATES = Counter("energy_duplicate_readings_total", "Readings received again and not counted.")
ENERGY = Counter("energy_received_kwh_total", "Energy in the distinct readings received, kWh.")
ACTIVE_DEVICES = Gauge("energy_active_devices", "Devices with a reading in the last 15 minutes.")
SILENT_DEVICES = Gauge(
    "energy_silent_devices", "Devices that sent readings in the last day but none for an hour."
)
UNREGISTERED_DEVICES = Gauge(
    "energy_unregistered_devices", "Active devices that are not in the tariff catalog."
)


class AnalyticsHandler:
    """Counts a reading once, however often the broker or the logger delivers it."""

    def __init__(self, tally: Tally, is_registered: Callable[[str], bool], top_n: int) -> None:
        self._tally = tally
        ACTIVE_DEVICES.set_function(lambda: len(tally.active_devices()))
        SILENT_DEVICES.set_function(tally.silent_devices)
        UNREGISTERED_DEVICES.set_function(
            lambda: sum(1 for d in tally.active_devices() if not is_registered(d))
        )
        _replace_collector(TopConsumers(tally, top_n))

    async def __call__(self, readings: Sequence[Reading]) -> None:
        for reading in readings:
            if self._tally.record(reading):
                READINGS.inc()
                ENERGY.inc(reading.usage_kwh)
            else:
                DUPLICATES.inc()


class TopConsumers(Collector):
    """``energy_top_consumer_kwh{rank, device_id}``: the top N devices of the last hour."""

    def __init__(self, tally: Tally, n: int) -> None:
        self._tally = tally
        self._n = n

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "energy_top_consumer_kwh",
            "kWh of the devices that used the most in the last hour, by rank (bounded top N).",
            labels=["rank", "device_id"],
        )
        for rank, (device_id, kwh) in enumerate(self._tally.top_consumers(self._n), start=1):
            family.add_metric([str(rank), device_id], kwh)
        yield family


_collectors: dict[str, Collector] = {}


def _replace_collector(collector: Collector) -> None:
    """Register once per process; a new app (in tests) replaces the previous one."""
    name = type(collector).__name__
    if name in _collectors:
        REGISTRY.unregister(_collectors[name])
    REGISTRY.register(collector)
    _collectors[name] = collector
