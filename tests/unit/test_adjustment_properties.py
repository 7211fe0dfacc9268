"""Adjustments of closed periods, by property: late readings, redeliveries, closes.

A device's readings arrive in any order, some twice (the ledger keeps one per reading id),
some after their month was closed and its bill issued. Each close issues the month's bill
carrying, for every earlier closed month Q, ``adjustment_for``: recompute(Q) - issued(Q) -
what bills issued after Q already carried for Q. Whatever the interleaving:

- issued(Q) + every adjustment for Q carried afterwards == Q's bill from all readings;
- once carried and issued, nothing more is carried for Q (the next bill's is None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from billing_service.domain.bill import (
    Adjustment,
    Bill,
    adjustment_for,
    compute_bill,
    period_of_month,
    with_adjustments,
)
from billing_service.domain.tariff import Tariff
from common.slots import slot_start

# Prices change mid-November and again in January; the tiers make a late reading's price
# depend on the energy before it, and the demand charge on the slots around it.
TARIFF = Tariff.model_validate(
    {
        "id": "versioned",
        "currency": "EUR",
        "time_zone": "Europe/Berlin",
        "versions": [
            {
                "standing_charge_per_day": "0.45",
                "tax_rate": "0.19",
                "energy": {"kind": "flat", "price_per_kwh": "0.3173"},
            },
            {
                "effective_from": "2026-11-15",
                "standing_charge_per_day": "0.50",
                "tax_rate": "0.07",
                "energy": {
                    "kind": "tiered",
                    "tiers": [
                        {"up_to_kwh": "3", "price_per_kwh": "0.211"},
                        {"up_to_kwh": None, "price_per_kwh": "0.333"},
                    ],
                },
                "demand": {"price_per_kw": "1.37"},
            },
            {
                "effective_from": "2027-01-01",
                "tax_rate": "0.19",
                "energy": {"kind": "flat", "price_per_kwh": "0.29"},
            },
        ],
    }
)
MONTHS = ["2026-10", "2026-11", "2026-12", "2027-01", "2027-02"]
PERIODS = [period_of_month(TARIFF, month) for month in MONTHS]


@dataclass(frozen=True)
class Reading:
    reading_id: str
    timestamp: datetime
    milliwh: int


@dataclass
class Issued:
    bill: Bill  # as issued: its own charges and the adjustments it carried
    bill_id: str


@dataclass
class Device:
    """The ledger (readings by id) and the bills issued so far, month by month."""

    ledger: dict[str, Reading] = field(default_factory=dict)
    issued: list[Issued] = field(default_factory=list)  # issued[n] is the bill of MONTHS[n]

    def receive(self, reading: Reading) -> None:
        self.ledger[reading.reading_id] = reading  # a redelivery overwrites itself

    def slots(self) -> dict[datetime, int]:
        found: dict[datetime, int] = {}
        for reading in self.ledger.values():
            start = slot_start(reading.timestamp)
            found[start] = found.get(start, 0) + reading.milliwh
        return found

    def open_bill(self) -> Bill:
        """The next month's bill with the adjustments it carries for every closed month."""
        month = len(self.issued)
        period, slots = PERIODS[month], self.slots()
        own = compute_bill(TARIFF, period, slots, period.end)
        adjustments = []
        for closed, issued in enumerate(self.issued):
            recomputed = compute_bill(TARIFF, PERIODS[closed], slots, PERIODS[closed].end)
            carried = self.carried_for(MONTHS[closed])
            adjustment = adjustment_for(
                recomputed,
                issued_total=issued.bill.charges,
                issued_energy_kwh=issued.bill.energy_kwh,
                already_adjusted_amount=sum((a.amount for a in carried), Decimal(0)),
                already_adjusted_energy=sum((a.energy_kwh for a in carried), Decimal(0)),
                issued_bill_id=issued.bill_id,
            )
            if adjustment is not None:
                adjustments.append(adjustment)
        return with_adjustments(own, adjustments)

    def close(self) -> None:
        bill = self.open_bill()
        self.issued.append(Issued(bill, f"B-{bill.period.label}"))

    def carried_for(self, label: str) -> list[Adjustment]:
        return [
            adjustment
            for issued in self.issued
            for adjustment in issued.bill.adjustments
            if adjustment.period_label == label
        ]


def readings_in(month: int) -> st.SearchStrategy[tuple[int, int]]:
    """(microseconds after the month's start, energy): a stamp in (start, end]."""
    period = PERIODS[month]
    span = (period.end - period.start) // timedelta(microseconds=1)
    return st.tuples(st.integers(1, span), st.integers(0, 3_000_000))


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, Reading | None]]:
    """A sequence of deliveries (new readings and redeliveries) and up to three closes."""
    events: list[tuple[str, Reading | None]] = []
    sent: list[Reading] = []
    for _ in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["reading", "reading", "redeliver", "close"]))
        if kind == "close":
            events.append(("close", None))
        elif kind == "redeliver" and sent:
            events.append(("deliver", draw(st.sampled_from(sent))))
        else:
            month = draw(st.integers(0, 3))
            offset, milliwh = draw(readings_in(month))
            stamp = PERIODS[month].start + timedelta(microseconds=offset)
            reading = Reading(f"r{len(sent)}", stamp, milliwh)
            sent.append(reading)
            events.append(("deliver", reading))
    return events


@settings(max_examples=150, deadline=None)
@given(history=histories())
def test_issued_plus_adjustments_is_the_bill_from_all_readings(history) -> None:
    device = Device()
    for kind, reading in history:
        if kind == "close":
            if len(device.issued) < len(MONTHS) - 2:
                device.close()
        else:
            assert reading is not None
            device.receive(reading)
    # The open bill carries what is still due; issue it too, as the next close would.
    device.close()
    final = device.slots()
    for month, issued in enumerate(device.issued[:-1]):
        label = MONTHS[month]
        truth = compute_bill(TARIFF, PERIODS[month], final, PERIODS[month].end)
        carried = device.carried_for(label)
        assert all(a.issued_bill_id == issued.bill_id for a in carried)
        assert issued.bill.charges + sum(a.amount for a in carried) == truth.charges
        assert issued.bill.energy_kwh + sum(a.energy_kwh for a in carried) == truth.energy_kwh
        assert len({id(a) for a in carried}) == len(carried)
    # Nothing is carried twice: with no new reading, the next bill carries nothing.
    if len(device.issued) < len(MONTHS):
        assert device.open_bill().adjustments == ()
    for issued in device.issued:
        bill = issued.bill
        assert bill.total == bill.subtotal + bill.tax + sum(a.amount for a in bill.adjustments)


@settings(max_examples=100, deadline=None)
@given(history=histories(), data=st.data())
def test_the_adjustments_depend_on_the_readings_not_their_order(history, data) -> None:
    # Close October, then deliver every reading in two different orders (with repeats):
    # November's bill carries the same adjustment for October.
    readings = [reading for kind, reading in history if reading is not None]
    early = data.draw(st.lists(st.sampled_from(readings), max_size=10)) if readings else []
    late = data.draw(st.permutations(readings + early))
    first, second = Device(), Device()
    for device in (first, second):
        for reading in early:
            device.receive(reading)
        device.close()
    for reading in readings:
        first.receive(reading)
    for reading in late:
        second.receive(reading)
    assert first.open_bill() == second.open_bill()


def test_adjustment_for_by_hand() -> None:
    # October issued with 2 kWh; 1.5 kWh more arrives late at 0.3173/kWh: 3.5 x 0.3173 =
    # 1.11055 -> 1.11 instead of 2 x 0.3173 = 0.6346 -> 0.63, so +0.48 before tax; the tax
    # on the subtotal goes from (0.63 + 13.95) x 0.19 = 2.7702 -> 2.77 to (1.11 + 13.95) x
    # 0.19 = 2.8614 -> 2.86, +0.09: the adjustment is +0.57 and +1.5 kWh.
    october = PERIODS[0]
    slot = october.start + timedelta(days=3)
    issued = compute_bill(TARIFF, october, {slot: 2_000_000}, october.end)
    recomputed = compute_bill(
        TARIFF, october, {slot: 2_000_000, slot + timedelta(hours=1): 1_500_000}, october.end
    )
    assert (issued.charges, recomputed.charges) == (Decimal("17.35"), Decimal("17.92"))
    adjustment = adjustment_for(
        recomputed, issued.charges, issued.energy_kwh, Decimal(0), Decimal(0), "B-2026-10"
    )
    assert adjustment == Adjustment("2026-10", "B-2026-10", Decimal("1.5"), Decimal("0.57"))
    # Carried once already: nothing more is due.
    assert (
        adjustment_for(
            recomputed,
            issued.charges,
            issued.energy_kwh,
            adjustment.amount,
            adjustment.energy_kwh,
            "B-2026-10",
        )
        is None
    )
    november = compute_bill(TARIFF, PERIODS[1], {}, PERIODS[1].end)
    carrying = with_adjustments(november, [adjustment])
    assert carrying.total == november.total + Decimal("0.57")
    assert carrying.charges == november.charges
