"""The read side: latest reading, bills, usage windows and pages of readings.

Redis answers what is hot (latest reading, the current month's slots) when it holds a
complete copy; the slots billing changed since, and anything Redis lacks, MongoDB answers,
and the copy is refreshed. With Redis down every
query still answers, from MongoDB.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from billing_service.adapters.catalog_file import locate_problems, parse_catalog
from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.mongo_bills import InvalidPageToken, IssuedBill, MongoBillStore
from billing_service.adapters.redis import MonthSlots, RedisCache
from billing_service.closing import DeviceBiller, issued_version_uses
from billing_service.domain import usage
from billing_service.domain.bill import (
    AccountBill,
    Bill,
    Period,
    billing_period,
    combine_bills,
    compute_bill,
    period_of_month,
)
from billing_service.domain.ledger import SlotKey, Total, TransientFailure
from billing_service.domain.tariff import (
    Account,
    Catalog,
    CatalogError,
    Tariff,
    closed_period_problems,
)
from billing_service.domain.usage import InvalidQuery, UsageBucket
from common.models import ID_PATTERN, ID_RULE, Reading

log = logging.getLogger(__name__)
PERIOD_PATTERN = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
DEFAULT_BILLS_PAGE, MAX_BILLS_PAGE = 12, 100


CACHE_UNAVAILABLE = Counter(
    "billing_query_cache_failures_total",
    "Queries answered from MongoDB alone because Redis failed, by cache operation.",
    ["operation"],
)
CACHE_LOG_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class DeviceBillAnswer:
    """An estimate (``bill``), or an issued bill: its ``Bill`` proto as stored (``issued``)."""

    bill: Bill | None
    unregistered: bool
    issued: bytes = b""


class NotFound(LookupError):
    """The thing asked for does not exist; the text says which."""


class NoCatalog(RuntimeError):
    """No tariffs are loaded yet."""


class CatalogHolder:
    """The tariff catalog as last loaded from MongoDB (``make seed`` writes it)."""

    def __init__(self, store: MongoCatalog, bills: MongoBillStore | None = None) -> None:
        self._store = store
        self._bills = bills
        self._loaded_at: datetime | None = None
        self.current: Catalog | None = None

    async def refresh(self) -> None:
        """Load the stored catalog if it changed. One that would change a closed period's
        bill (``make seed`` refuses those; another writer might not) is refused: the
        previous catalog stays, and the problems are raised as CatalogError."""
        stored = await self._store.load()
        if stored is None or stored.loaded_at == self._loaded_at:
            return
        catalog = parse_catalog(stored.text, stored.source)
        if self._bills is not None:
            problems = closed_period_problems(catalog, await issued_version_uses(self._bills))
            if problems:
                lines = locate_problems(stored.text, stored.source, problems)
                raise CatalogError("\n".join(lines))
        self.current = catalog
        self._loaded_at = stored.loaded_at
        log.info("tariff catalog loaded", extra={"source": stored.source})

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh()
            except CatalogError as error:  # logged at each refresh while it is stored
                log.error(
                    "refused the stored tariff catalog; keeping the previous one",
                    extra={"problems": str(error)},
                )
            except Exception:  # a bad or unreachable catalog keeps the previous one
                log.exception("could not reload the tariff catalog; keeping the previous one")

    @property
    def loaded_at(self) -> datetime | None:
        """When ``make seed`` stored the catalog held now (None: none yet)."""
        return self._loaded_at

    def is_registered(self, device_id: str) -> bool:
        return self.current is not None and self.current.device(device_id) is not None

    def require(self) -> Catalog:
        if self.current is None:
            raise NoCatalog("no tariffs are loaded; load them with `make seed`")
        return self.current


class BillingQueries:
    """Answers the read API from Redis and MongoDB."""

    def __init__(
        self,
        ledger: MongoLedger,
        cache: RedisCache,
        catalog: CatalogHolder,
        max_buckets: int,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        bills: MongoBillStore | None = None,
    ) -> None:
        self._ledger = ledger
        self._cache = cache
        self._catalog = catalog
        self._max_buckets = max_buckets
        self._clock = clock
        self._cache_failed_at: datetime | None = None
        self.bills = bills if bills is not None else MongoBillStore(ledger.database)
        self.biller = DeviceBiller(self.slot_energy, ledger.late_writes)

    async def latest(self, device_id: str) -> Reading:
        check_id("device_id", device_id)
        try:
            cached = await self._cache.latest(device_id)
        except TransientFailure as error:
            cached = self._without_cache("latest", error)
        if cached is not None:
            return cached
        reading = await self._ledger.latest(device_id)
        if reading is None:
            raise NotFound(f"device {device_id!r} has no readings")
        try:
            await self._cache.put_latest(reading)
        except TransientFailure as error:  # MongoDB answered; the cache refills later
            self._without_cache("put_latest", error)
        return reading

    async def device_bill(self, device_id: str, period_label: str) -> DeviceBillAnswer:
        """The device's issued bill for a closed period, else its estimate with the
        adjustments of its account's earlier issued bills. A device the catalog does not
        list (billed under the default tariff) has no account: an estimate, never issued."""
        check_id("device_id", device_id)
        catalog = self._catalog.require()
        device = catalog.device(device_id)
        tariff = catalog.tariff(device.tariff if device else catalog.default_tariff)
        period, as_of = self._period(tariff, period_label)
        if device is None:
            slots = await self.slot_energy(device_id, period.start, period.end)
            if not slots:
                raise NotFound(
                    f"device {device_id!r} is not registered and has no readings in {period.label}"
                )
            return DeviceBillAnswer(compute_bill(tariff, period, slots, as_of), unregistered=True)
        if period.end <= self._clock():
            issued = await self.bills.get(device.account, period.label)
            part = issued.device(device_id) if issued is not None else None
            if part is not None:
                return DeviceBillAnswer(None, unregistered=False, issued=part.bill_bytes)
        earlier = await self.bills.of_account(device.account)
        bill = await self.biller.bill(device_id, tariff, period, as_of, catalog, earlier)
        return DeviceBillAnswer(bill, unregistered=False)

    async def account_bill(self, account_id: str, period_label: str) -> AccountBill | IssuedBill:
        """The account's issued bill for a closed period, else its estimate (with the
        adjustments of its earlier issued bills)."""
        check_id("account_id", account_id)
        catalog = self._catalog.require()
        devices = catalog.devices_of(account_id)
        if not devices:
            raise NotFound(f"account {account_id!r} is not in the catalog or has no devices")
        period, as_of = self._period(catalog.tariff(devices[0].tariff), period_label)
        if period.end <= self._clock():
            issued = await self.bills.get(account_id, period.label)
            if issued is not None:
                return issued
        earlier = await self.bills.of_account(account_id)
        bills = {}
        for device in devices:
            tariff = catalog.tariff(device.tariff)
            period, as_of = self._period(tariff, period_label)
            bills[device.id] = await self.biller.bill(
                device.id, tariff, period, as_of, catalog, earlier
            )
        return combine_bills(account_id, bills)

    def device_account(self, device_id: str) -> str:
        """The account the catalog bills the device to; empty when it does not list it."""
        check_id("device_id", device_id)
        device = self._catalog.require().device(device_id)
        return device.account if device is not None else ""

    def account(self, account_id: str) -> tuple[Account, int]:
        """The catalog's account and how many devices it bills to it; NotFound otherwise."""
        check_id("account_id", account_id)
        catalog = self._catalog.require()
        found = next((a for a in catalog.accounts if a.id == account_id), None)
        if found is None:
            raise NotFound(
                f"account {account_id!r} is not in billing's tariff catalog; add it to the "
                "catalog and load it with `make seed`"
            )
        return found, len(catalog.devices_of(account_id))

    async def list_bills(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[IssuedBill], str]:
        """The account's issued bills, newest first, a page at a time."""
        check_id("account_id", account_id)
        if page_size > MAX_BILLS_PAGE:
            raise InvalidQuery(f"page_size {page_size} is above {MAX_BILLS_PAGE}; ask for less")
        try:
            return await self.bills.page(account_id, page_size or DEFAULT_BILLS_PAGE, page_token)
        except InvalidPageToken as error:
            raise InvalidQuery(str(error)) from None

    async def usage(
        self, device_id: str, start: datetime, end: datetime, window: str, zone_name: str
    ) -> list[UsageBucket]:
        check_id("device_id", device_id)
        starts = usage.window_starts(
            start, end, window, usage.time_zone(zone_name), self._max_buckets
        )
        if window in usage.FROM_SLOTS:
            rows = await self._ledger.slots(device_id, start, end)
            return usage.from_slots(
                starts,
                (
                    (r.start, r.total.count, r.total.usage_milliwh, r.min_milliwh, r.max_milliwh)
                    for r in rows
                ),
            )
        readings = await self._ledger.readings_ending_in(device_id, start, end)
        return usage.from_readings(starts, readings)

    async def readings_page(
        self,
        device_id: str,
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[Reading], str]:
        check_id("device_id", device_id)
        if page_size > MAX_PAGE_SIZE:
            raise InvalidQuery(f"page_size {page_size} is above {MAX_PAGE_SIZE}; ask for less")
        if start is not None and end is not None and end <= start:
            raise InvalidQuery("end must be after start")
        size = page_size or DEFAULT_PAGE_SIZE
        query = _query_key(device_id, start, end)
        after = _decode_token(page_token, query) if page_token else None
        readings = await self._ledger.readings_page(device_id, start, end, after, size + 1)
        if len(readings) <= size:
            return readings, ""
        last = readings[size - 1]
        return readings[:size], _encode_token(last, query)

    def _period(self, tariff: Tariff, label: str) -> tuple[Period, datetime]:
        now = self._clock()
        if not label:
            return billing_period(tariff, now), now
        if not PERIOD_PATTERN.fullmatch(label):
            raise InvalidQuery(
                f"period {label!r} is not a month; use YYYY-MM, or leave it empty for the "
                "current period"
            )
        period = period_of_month(tariff, label)
        if period.start > now:
            raise InvalidQuery(f"period {label} has not started yet in {tariff.time_zone}")
        return period, min(now, period.end)

    async def slot_energy(
        self, device_id: str, start: datetime, end: datetime
    ) -> dict[datetime, int]:
        """Milliwatt-hours by slot start in [start, end)."""
        totals = await self.slot_totals(device_id, start, end)
        return {slot: total.usage_milliwh for slot, total in totals.items()}

    async def slot_totals(
        self, device_id: str, start: datetime, end: datetime
    ) -> dict[datetime, Total]:
        """The device's slot totals by start in [start, end): Redis, else MongoDB."""
        totals: dict[datetime, Total] = {}
        for month_start, month_end in _utc_months(start, end):
            month = await self._month_totals(device_id, month_start, month_end)
            totals.update({s: t for s, t in month.items() if start <= s < end})
        return totals

    async def _month_totals(
        self, device_id: str, month_start: datetime, month_end: datetime
    ) -> dict[datetime, Total]:
        """A month Redis holds in full is read from it, except the slots billing changed
        since, which MongoDB answers; any other month is read from MongoDB. What MongoDB
        answered is put back into Redis."""
        month = month_start.strftime("%Y-%m")
        cached: MonthSlots | None
        try:
            cached = await self._cache.month_slots(device_id, month)
        except TransientFailure as error:  # MongoDB answers alone
            cached = self._without_cache("month_slots", error)
        if cached is not None and cached.current:
            return cached.slots
        if cached is not None and cached.complete:
            changed = [SlotKey(device_id, start) for start in cached.changed]
            read = {
                key.start: row.total for key, row in (await self._ledger.slot_rows(changed)).items()
            }
            totals = {**cached.slots, **read}
        else:
            read = {
                row.start: row.total
                for row in await self._ledger.slots(device_id, month_start, month_end)
            }
            totals = read
        if cached is not None:
            try:
                await self._cache.refresh_month(
                    device_id, month, read, cached.changed, complete=not cached.complete
                )
            except TransientFailure as error:  # MongoDB answered; the cache refills later
                self._without_cache("refresh_month", error)
        return totals

    def _without_cache(self, operation: str, error: TransientFailure) -> None:
        """Redis failed a query: counted every time, logged once per outage (MongoDB answers)."""
        CACHE_UNAVAILABLE.labels(operation).inc()
        now = self._clock()
        if self._cache_failed_at is None or now - self._cache_failed_at > CACHE_LOG_EVERY:
            log.warning(
                "Redis unavailable; queries read MongoDB",
                extra={"operation": operation, "error": str(error)},
            )
            self._cache_failed_at = now

    def catalog_snapshot(self) -> tuple[datetime, Catalog]:
        """The catalog billing holds and when ``make seed`` stored it, read in one step.

        ``CatalogHolder.refresh`` sets both without an await between, so they match.
        """
        catalog = self._catalog.require()
        loaded_at = self._catalog.loaded_at
        if loaded_at is None:  # require() passed, so refresh() set both
            raise NoCatalog("no tariffs are loaded; load them with `make seed`")
        return loaded_at, catalog

    async def latest_timestamps(self) -> dict[str, datetime]:
        """Every cached device's latest reading timestamp, from Redis (TransientFailure if
        Redis is down: only a scan of every reading in MongoDB could answer instead)."""
        return await self._cache.latest_timestamps()


def check_id(name: str, value: str) -> None:
    if not value:
        raise InvalidQuery(f"{name} is empty; give one ({ID_RULE})")
    if not ID_PATTERN.fullmatch(value):
        raise InvalidQuery(f"{name} {value[:40]!r} is not valid; use {ID_RULE}")


def _utc_months(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    """The UTC calendar months overlapping [start, end), as [month start, next month start)."""
    months = []
    month = start.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while month < end:
        following = (month + timedelta(days=32)).replace(day=1)
        months.append((month, following))
        month = following
    return months


def _query_key(device_id: str, start: datetime | None, end: datetime | None) -> str:
    text = f"{device_id}|{start.isoformat() if start else ''}|{end.isoformat() if end else ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encode_token(last: Reading, query: str) -> str:
    payload = {"t": last.timestamp.isoformat(), "id": last.reading_id, "q": query}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _decode_token(token: str, query: str) -> tuple[datetime, str]:
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
        after = (datetime.fromisoformat(payload["t"]), str(payload["id"]))
        same_query = payload["q"] == query
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidQuery(
            "page_token is not one this service issued; start again without a page_token"
        ) from None
    if not same_query:
        raise InvalidQuery(
            "page_token belongs to a query with another device_id, start or end; use the same "
            "ones, or start again without a page_token"
        )
    return after
