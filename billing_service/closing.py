"""Closing billing periods: an account's bill for a month, issued once and never changed.

``close_period(account, month)`` bills every device of the account for the month (as of
its end), with the corrections of earlier issued bills frozen into it (late readings, as
adjustments), reserves the account's next bill number and stores the bill
(``adapters.mongo_bills``). Any number of billing processes, and ``make close-period``, may
close the same period at once: one bill is stored, and every caller gets it.

Only accounts are billed: a device the catalog does not list has no account, so its bills
stay estimates (GetDeviceBill answers them as ESTIMATE, under the default tariff) and are
never issued.

``DeviceBiller`` is shared with the read side, so an open period's estimate carries the
same adjustments its bill will carry when issued.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from prometheus_client import Counter

from billing_service.adapters.mongo import MongoLedger
from billing_service.adapters.mongo_bills import (
    CarriedAdjustment,
    IssuedBill,
    IssuedDevice,
    MongoBillStore,
    UsedVersion,
)
from billing_service.bill_messages import account_message, issue
from billing_service.domain.bill import (
    Adjustment,
    Bill,
    Period,
    adjustment_for,
    billing_period,
    combine_bills,
    compute_bill,
    period_of_month,
    with_adjustments,
)
from billing_service.domain.late import ALWAYS_CHANGED, CLOSE_AFTER_END, LateWrites
from billing_service.domain.tariff import (
    Catalog,
    IssuedVersionUse,
    Tariff,
    version_fingerprint,
)

log = logging.getLogger(__name__)

# (device_id, start, end) -> milliwatt-hours by slot start in [start, end)
SlotEnergy = Callable[[str, datetime, datetime], Awaitable[dict[datetime, int]]]
# device_id -> its late-write marks (domain/late.py)
LateWritesOf = Callable[[str], Awaitable[LateWrites]]

BILLS_CLOSED = Counter(
    "billing_bills_closed_total",
    "Attempts to close an account's period, by outcome (issued: stored by this process; "
    "already_issued: found stored; failed: an error, retried on the next check).",
    ["outcome"],
)


def ledger_slot_energy(ledger: MongoLedger) -> SlotEnergy:
    """Slots read from MongoDB, the source of truth (what closing bills from)."""

    async def slot_energy(device_id: str, start: datetime, end: datetime) -> dict[datetime, int]:
        return {
            row.start: row.total.usage_milliwh for row in await ledger.slots(device_id, start, end)
        }

    return slot_energy


class PeriodNotClosable(ValueError):
    """The period cannot be closed (it has not ended, or the account has no devices)."""


@dataclass(frozen=True)
class Closed:
    """The outcome of a close: the stored bill and whether this call issued it."""

    bill: IssuedBill
    issued_now: bool


def last_local_day(tariff: Tariff, period: Period) -> date:
    """The period's last day in the tariff's time zone."""
    return period.end.astimezone(tariff.zone).date() - timedelta(days=1)


def used_versions(tariff: Tariff, period: Period) -> list[UsedVersion]:
    """The tariff's versions in force on the period's local days (what its bill used)."""
    first = period.start.astimezone(tariff.zone).date()
    after = period.end.astimezone(tariff.zone).date()
    return [
        UsedVersion(
            tariff.id,
            span.version.effective_from.isoformat() if span.version.effective_from else None,
            version_fingerprint(span.version),
        )
        for span in tariff.versions_between(first, after)
    ]


async def issued_version_uses(store: MongoBillStore) -> list[IssuedVersionUse]:
    """Every tariff version that priced an issued bill, for ``closed_period_problems``."""
    return [
        IssuedVersionUse(
            tariff_id=version.tariff_id,
            effective_from=date.fromisoformat(version.effective_from)
            if version.effective_from
            else None,
            fingerprint=version.fingerprint,
            period_label=bill.period,
            period_end_local_date=date.fromisoformat(bill.period_end_local_date),
            bill_id=bill.bill_id,
        )
        for bill, version in await store.all_versions()
    ]


class DeviceBiller:
    """A device's bill for a period, with adjustments for the account's earlier issued bills."""

    def __init__(self, slot_energy: SlotEnergy, late_writes: LateWritesOf | None = None) -> None:
        """Without ``late_writes``, every issued month is recomputed for its adjustment."""
        self._slot_energy = slot_energy
        self._late_writes = late_writes

    async def bill(
        self,
        device_id: str,
        tariff: Tariff,
        period: Period,
        as_of: datetime,
        catalog: Catalog,
        issued: Sequence[IssuedBill],
    ) -> Bill:
        """The bill of ``period`` as of ``as_of``, carrying the adjustments of every bill in
        ``issued`` (the account's, any period) for a period before this one."""
        slots = await self._slot_energy(device_id, period.start, period.end)
        bill = compute_bill(tariff, period, slots, as_of)
        adjustments = await self.adjustments(device_id, catalog, period.label, issued)
        return with_adjustments(bill, adjustments) if adjustments else bill

    async def adjustments(
        self, device_id: str, catalog: Catalog, before: str, issued: Sequence[IssuedBill]
    ) -> list[Adjustment]:
        """For each issued period Q before ``before`` whose bill included the device: its
        bill recomputed now (each day at the tariff version in force then, which the catalog
        check keeps as issued; the slots now; as of Q's end), minus
        what was issued and what bills after Q already carried for Q. A Q whose slots no
        late write touched since the last bill that included the device was issued is
        skipped: that bill saw them as they are, so its adjustment would be zero."""
        found = []
        late: LateWrites | None = None
        for earlier in issued:
            part = earlier.device(device_id)
            if earlier.period >= before or part is None:
                continue
            if late is None:
                late = await self._late_writes(device_id) if self._late_writes else ALWAYS_CHANGED
            try:
                tariff = catalog.tariff(part.tariff_id)
            except KeyError:  # the catalog check keeps a used tariff; log, never guess
                log.error(
                    "tariff of an issued bill is not in the catalog; no adjustment",
                    extra={"bill_id": earlier.bill_id, "tariff_id": part.tariff_id},
                )
                continue
            period = period_of_month(tariff, earlier.period)
            if not late.may_have_changed(
                period.start, period.end, _last_seen(device_id, earlier.period, issued)
            ):
                continue
            slots = await self._slot_energy(device_id, period.start, period.end)
            recomputed = compute_bill(tariff, period, slots, period.end)
            carried = _carried(device_id, earlier.period, issued)
            adjustment = adjustment_for(
                recomputed,
                part.charges,
                part.energy_kwh,
                sum((a.amount for a in carried), Decimal(0)),
                sum((a.energy_kwh for a in carried), Decimal(0)),
                earlier.bill_id,
            )
            if adjustment is not None:
                found.append(adjustment)
        return found


def _issued_device(device_id: str, bill: Bill, bill_bytes: bytes) -> IssuedDevice:
    return IssuedDevice(
        device_id=device_id,
        tariff_id=bill.tariff_id,
        total=bill.total,
        charges=bill.charges,
        energy_kwh=bill.energy_kwh,
        adjustments=tuple(
            CarriedAdjustment(a.period_label, a.amount, a.energy_kwh) for a in bill.adjustments
        ),
        bill_bytes=bill_bytes,
    )


def _last_seen(device_id: str, period: str, issued: Sequence[IssuedBill]) -> datetime:
    """When the last bill that read the device's ``period`` was issued: its own, or a later
    one that included the device (which worked out the period's adjustment)."""
    return max(
        bill.issued_at
        for bill in issued
        if bill.period >= period and bill.device(device_id) is not None
    )


def _carried(device_id: str, period: str, issued: Sequence[IssuedBill]) -> list[CarriedAdjustment]:
    """The adjustments for ``period`` that the device's later issued bills carried."""
    return [
        adjustment
        for bill in issued
        if bill.period > period and (part := bill.device(device_id)) is not None
        for adjustment in part.adjustments
        if adjustment.period == period
    ]


class BillCloser:
    """Issues accounts' bills for closed periods."""

    def __init__(
        self,
        biller: DeviceBiller,
        store: MongoBillStore,
        catalog: Callable[[], Catalog],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._biller = biller
        self._store = store
        self._catalog = catalog
        self._clock = clock

    async def close_period(self, account_id: str, label: str) -> Closed:
        """Issue the account's bill for the local month ``label`` (YYYY-MM), or return the
        one issued already. PeriodNotClosable if the month has not ended."""
        stored = await self._store.get(account_id, label)
        if stored is not None:
            return Closed(stored, False)
        catalog = self._catalog()
        devices = catalog.devices_of(account_id)
        if not devices:
            raise PeriodNotClosable(
                f"account {account_id!r} is not in the catalog or has no devices; nothing to bill"
            )
        first = catalog.tariff(devices[0].tariff)  # the account's tariffs share a time zone
        try:
            period = period_of_month(first, label)
        except ValueError as error:
            raise PeriodNotClosable(str(error)) from None
        now = self._clock()
        if now < period.end:
            raise PeriodNotClosable(
                f"period {label} of account {account_id!r} has not ended in {first.time_zone} "
                f"(it ends {period.end.isoformat()}); close it after "
                f"{(period.end + CLOSE_AFTER_END).isoformat()}"
            )
        if now < period.end + CLOSE_AFTER_END:
            raise PeriodNotClosable(
                f"period {label} of account {account_id!r} ended less than "
                f"{CLOSE_AFTER_END.total_seconds() / 3600:g} h ago, at {period.end.isoformat()}; "
                f"its last readings may still be on their way: close it after "
                f"{(period.end + CLOSE_AFTER_END).isoformat()}"
            )
        issued = await self._store.of_account(account_id)
        bills: dict[str, Bill] = {}
        versions: dict[tuple[str, str], UsedVersion] = {}
        for device in devices:
            tariff = catalog.tariff(device.tariff)
            bills[device.id] = await self._biller.bill(
                device.id, tariff, period, period.end, catalog, issued
            )
            for version in used_versions(tariff, period):
                versions[(version.tariff_id, version.effective_from or "")] = version
        account = combine_bills(account_id, bills)
        number = await self._store.reserve_number(account_id, label)
        bill_id = f"{account_id}-{label}"
        # MongoDB keeps milliseconds: the stored proto says what the document says.
        issued_at = now.replace(microsecond=now.microsecond // 1000 * 1000)
        message = account_message(account)
        issue(message, bill_id, number, issued_at)
        bill = IssuedBill(
            account_id=account_id,
            period=label,
            period_end_local_date=last_local_day(first, period).isoformat(),
            number=number,
            bill_id=bill_id,
            issued_at=issued_at,
            currency=account.currency,
            total=account.total,
            devices=tuple(
                _issued_device(
                    m.device_id, bills[m.device_id], m.SerializeToString(deterministic=True)
                )
                for m in message.bills
            ),
            versions=tuple(versions.values()),
            response_bytes=message.SerializeToString(deterministic=True),
        )
        stored, issued_now = await self._store.insert(bill)
        return Closed(stored, issued_now)

    def due_period(self, catalog: Catalog, account_id: str, grace: timedelta) -> str | None:
        """The latest local month of the account whose end + ``grace`` (at least
        ``CLOSE_AFTER_END``) has passed."""
        devices = catalog.devices_of(account_id)
        if not devices:
            return None
        tariff = catalog.tariff(devices[0].tariff)
        now = self._clock()
        grace = max(grace, CLOSE_AFTER_END)
        period = billing_period(tariff, now - grace)
        # The month holding now - grace has not ended grace ago; the one before has.
        previous = billing_period(tariff, period.start - timedelta(seconds=1))
        return previous.label

    async def close_due(self, grace: timedelta) -> list[Closed]:
        """Close, for every account of the catalog, its latest month ended ``grace`` ago and
        any month its book numbered without storing the bill (a close that stopped half-way,
        whose number would otherwise stay a gap), unless issued. A failing account or month
        is logged and counted; the others go on."""
        catalog = self._catalog()
        closed = []
        for account in catalog.accounts:
            label = self.due_period(catalog, account.id, grace)
            if label is None:
                continue
            try:
                unfinished = await self._store.numbered_unissued(account.id)
            except Exception:
                BILLS_CLOSED.labels("failed").inc()
                log.exception(
                    "could not read the account's bill book; retried on the next check",
                    extra={"account_id": account.id},
                )
                continue
            for period in dict.fromkeys([*unfinished, label]):
                if (result := await self._close_logged(account.id, period)) is not None:
                    closed.append(result)
        return closed

    async def _close_logged(self, account_id: str, label: str) -> Closed | None:
        """Close one period unless issued; log and count what happened (None: nothing new
        to report, or a failure retried on the next check)."""
        try:
            if await self._store.get(account_id, label, with_bytes=False) is not None:
                return None
            result = await self.close_period(account_id, label)
        except Exception:
            BILLS_CLOSED.labels("failed").inc()
            log.exception(
                "could not close a period; retried on the next check",
                extra={"account_id": account_id, "period": label},
            )
            return None
        BILLS_CLOSED.labels("issued" if result.issued_now else "already_issued").inc()
        if result.issued_now:
            log.info(
                "bill issued",
                extra={
                    "account_id": account_id,
                    "period": label,
                    "bill_id": result.bill.bill_id,
                    "number": result.bill.number,
                    "total": str(result.bill.total),
                },
            )
        return result

    async def close_forever(self, interval_s: float, grace: timedelta) -> None:
        """``close_due`` every ``interval_s``, the first time at once."""
        while True:
            try:
                await self.close_due(grace)
            except Exception:  # e.g. no catalog yet: try again next time
                log.exception("closing periods failed; retried on the next check")
            await asyncio.sleep(interval_s)
