"""Fleet peak demand: 15-minute UTC slots summed over devices, the month's highest, kW."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from analytics_service.consumer import AnalyticsHandler
from analytics_service.domain.demand import FleetDemand, Peak, slot_index
from analytics_service.domain.tally import Tally, Windows
from common.models import Reading, validate_reading
from common.slots import slot_start

NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


class Clock:
    """Wall clock in unix seconds, moved by the test."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def reading(device: str, ends: datetime, kwh: float) -> Reading:
    return validate_reading(device, ends, kwh, now=ends + timedelta(days=1))


def seconds(at: datetime) -> int:
    return int(at.timestamp())


def test_demand_is_the_energy_of_a_slot_summed_over_devices_times_4() -> None:
    demand = FleetDemand(Clock(NOV + timedelta(days=20)))
    assert demand.peak() == Peak(0.0, 0)
    at_10 = NOV + timedelta(days=3, hours=10)
    # 10:00-10:15: meter a 0.5 + 0.25 (two readings), b 1.0 -> 1.75 kWh, 7 kW.
    ten_to_quarter_past = [
        reading("a", at_10 + timedelta(minutes=5), 0.5),
        reading("a", at_10 + timedelta(minutes=10), 0.25),
        reading("b", at_10 + timedelta(minutes=15), 1.0),  # ends at 10:15: this slot
    ]
    assert demand.add_batch(ten_to_quarter_past) == 3
    # 10:15-10:30: 1.5 kWh -> 6 kW, lower.
    demand.add_batch([reading("a", at_10 + timedelta(minutes=15, microseconds=1), 1.5)])
    assert demand.peak() == Peak(7.0, seconds(at_10))
    # 10:30-10:45 overtakes it: 2.0 kWh -> 8 kW.
    demand.add_batch([reading("c", at_10 + timedelta(minutes=45), 2.0)])
    assert demand.peak() == Peak(8.0, seconds(at_10 + timedelta(minutes=30)))


def test_the_slots_are_billings() -> None:
    for ends in (
        NOV + timedelta(hours=10, minutes=15),
        NOV + timedelta(hours=10, minutes=15, microseconds=1),
        NOV + timedelta(hours=10, minutes=29, seconds=59),
        datetime(2026, 11, 1, 12, 0, tzinfo=UTC).astimezone(),  # any time zone
    ):
        assert slot_index(ends) * 900 == seconds(slot_start(ends)), ends


def test_milliwatt_hours_add_up_exactly() -> None:
    demand = FleetDemand(Clock(NOV))
    ends = NOV + timedelta(hours=1)
    tenths = [reading(f"m-{device}", ends, 0.1) for device in range(10)]  # inexact floats
    demand.add_batch(tenths)
    assert demand.peak() == Peak(4.0, seconds(ends - timedelta(minutes=15)))


def test_equal_slots_the_earliest_is_the_peak_whatever_the_order() -> None:
    demand = FleetDemand(Clock(NOV + timedelta(days=1)))
    late, early = NOV + timedelta(hours=5), NOV + timedelta(hours=2)
    demand.add_batch([reading("a", late, 1.0), reading("a", early, 1.0)])
    assert demand.peak() == Peak(4.0, seconds(early - timedelta(minutes=15)))
    demand.add_batch([reading("b", late, 0.0)])  # still equal
    assert demand.peak().slot_start_s == seconds(early - timedelta(minutes=15))


def test_each_reading_of_a_batch_goes_to_its_own_slot() -> None:
    demand = FleetDemand(Clock(NOV + timedelta(days=1)))
    at = NOV + timedelta(hours=3)
    after = at + timedelta(microseconds=1)  # the next slot
    batch = [reading("a", at, 1.0), reading("b", after, 2.0), reading("c", at, 1.5)]
    assert demand.add_batch(batch) == 3
    assert demand.peak() == Peak(10.0, seconds(at - timedelta(minutes=15)))
    demand.add_batch([reading("d", at + timedelta(minutes=15), 1.0)])
    assert demand.peak() == Peak(12.0, seconds(at))


def test_readings_outside_the_current_month_are_ignored() -> None:
    demand = FleetDemand(Clock(NOV + timedelta(days=10)))
    outside = [
        reading("a", NOV - timedelta(minutes=1), 100.0),  # October
        reading("a", NOV, 100.0),  # ends at midnight: its interval is October's last slot
        reading("a", DEC + timedelta(minutes=1), 100.0),  # December
    ]
    assert demand.add_batch(outside) == 0
    assert demand.peak() == Peak(0.0, 0)
    inside = [
        reading("a", NOV + timedelta(microseconds=1), 0.5),  # November's first slot
        reading("a", DEC, 0.25),  # November's last slot
    ]
    assert demand.add_batch(outside[:1] + inside + outside[1:]) == 2
    assert demand.peak() == Peak(2.0, seconds(NOV))


def test_the_month_turns_and_the_previous_is_dropped() -> None:
    clock = Clock(DEC - timedelta(minutes=1))
    demand = FleetDemand(clock)
    demand.add_batch([reading("a", DEC - timedelta(minutes=1), 5.0)])
    assert demand.peak() == Peak(20.0, seconds(DEC - timedelta(minutes=15)))
    clock.now = DEC.timestamp() + 1
    assert demand.peak() == Peak(0.0, 0)  # a new month: nothing yet, even unasked
    assert demand.add_batch([reading("a", DEC, 1.0)]) == 0  # November's, late
    demand.add_batch([reading("a", DEC + timedelta(minutes=20), 0.5)])
    assert demand.peak() == Peak(2.0, seconds(DEC + timedelta(minutes=15)))


def test_a_reading_of_the_next_month_turns_it_when_the_clock_has() -> None:
    clock = Clock(DEC - timedelta(minutes=1))
    demand = FleetDemand(clock)
    demand.add_batch([reading("a", DEC - timedelta(minutes=1), 5.0)])
    clock.now = DEC.timestamp() + 1
    assert demand.add_batch([reading("a", DEC + timedelta(minutes=1), 1.0)]) == 1  # turns it
    assert demand.peak() == Peak(4.0, seconds(DEC))


def test_memory_is_one_integer_per_slot_of_the_month() -> None:
    demand = FleetDemand(Clock(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)))
    assert len(demand._milliwh) == 31 * 96
    demand = FleetDemand(Clock(datetime(2028, 2, 29, tzinfo=UTC)))
    assert len(demand._milliwh) == 29 * 96


def test_a_redelivered_reading_does_not_raise_the_peak() -> None:
    """Through the handler: the tally's deduplication decides what the demand counts."""
    ends = NOV + timedelta(days=2, hours=7, minutes=3)
    demand = FleetDemand(Clock(NOV + timedelta(days=9)))
    handler = AnalyticsHandler(
        Tally(Windows(), max_remembered=100), demand, lambda _: True, top_n=3
    )
    once = reading("a", ends, 1.0)
    asyncio.run(handler([once, reading("b", ends, 0.5), once]))
    asyncio.run(handler([once]))
    assert demand.peak() == Peak(6.0, seconds(slot_start(ends)))
    assert REGISTRY.get_sample_value("fleet_peak_demand_kw") == pytest.approx(6.0)
    assert REGISTRY.get_sample_value("fleet_peak_demand_slot_start_seconds") == seconds(
        slot_start(ends)
    )
