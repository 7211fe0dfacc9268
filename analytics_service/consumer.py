"""Turns each reading into business metrics; no label grows with the number of devices.

The per-device views (active, silent, unregistered, top consumers) are computed from the
tally when Prometheus scrapes; only the top-N carries a device_id label, N series at most.
The fleet's peak demand of the month is read from ``FleetDemand`` the same way, no label.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from analytics_service.domain.demand import FleetDemand
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

    def __init__(
        self,
        tally: Tally,
        demand: FleetDemand,
        is_registered: Callable[[str], bool],
        top_n: int,
    ) -> None:
        self._tally = tally
        self._demand = demand
        ACTIVE_DEVICES.set_function(lambda: len(tally.active_devices()))
        SILENT_DEVICES.set_function(tally.silent_devices)
        UNREGISTERED_DEVICES.set_function(
            lambda: sum(1 for d in tally.active_devices() if not is_registered(d))
        )
        _replace_collector(TopConsumers(tally, top_n))
        _replace_collector(PeakDemand(demand))

    async def __call__(self, readings: Sequence[Reading]) -> None:
        new = self._tally.record_batch(readings)
        # Only what the tally counted as new: a redelivery must not raise the peak.
        self._demand.add_batch(new)
        # Once per batch: each inc takes the counter's lock.
        READINGS.inc(len(new))
        ENERGY.inc(sum(reading.usage_kwh for reading in new))
        DUPLICATES.inc(len(readings) - len(new))


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


class PeakDemand(Collector):
    """``fleet_peak_demand_kw`` and ``fleet_peak_demand_slot_start_seconds``: one snapshot."""

    def __init__(self, demand: FleetDemand) -> None:
        self._demand = demand

    def collect(self) -> Iterator[GaugeMetricFamily]:
        peak = self._demand.peak()  # both gauges from one reading of the tally
        yield GaugeMetricFamily(
            "fleet_peak_demand_kw",
            "Highest 15-minute demand of all devices together so far this UTC calendar month "
            "(not billing's local tariff months), kW: per slot of the 15-minute UTC grid, the "
            "kWh of the distinct readings whose interval ends in it, times 4. 0 before the "
            "month's first energy; starts empty when analytics starts.",
            value=peak.kw,
        )
        yield GaugeMetricFamily(
            "fleet_peak_demand_slot_start_seconds",
            "Unix time of the start of the 15-minute UTC slot of fleet_peak_demand_kw (the "
            "earliest of equal slots); 0 before the month's first energy.",
            value=peak.slot_start_s,
        )


_collectors: dict[str, Collector] = {}


def _replace_collector(collector: Collector) -> None:
    """Register once per process; a new app (in tests) replaces the previous one."""
    name = type(collector).__name__
    if name in _collectors:
        REGISTRY.unregister(_collectors[name])
    REGISTRY.register(collector)
    _collectors[name] = collector
