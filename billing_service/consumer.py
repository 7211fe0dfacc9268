"""Billing a batch of readings: MongoDB first (retried until it succeeds), then Redis.

The shared consumer acks a batch only after this returns, so an ack always follows a write
that MongoDB acknowledged. Each batch costs a few MongoDB writes and one Redis pipeline,
however many readings it holds, and reads nothing back: Redis learns which slots changed
(readers refresh them from MongoDB) and each device's latest reading. Redis is a cache:
when it is down, billing goes on and marks the slots once Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Sequence

from prometheus_client import Counter, Gauge

from billing_service.domain.ledger import Cache, Ledger, SlotKey, TransientFailure
from common.models import Reading
from common.retry import UNTIL_IT_SUCCEEDS, RetryPolicy, retrying

log = logging.getLogger(__name__)

READINGS = Counter("billing_readings_total", "Readings recorded, by result.", ["result"])
BILLED, DUPLICATES = READINGS.labels("billed"), READINGS.labels("duplicate")
UNREGISTERED = Counter(
    "billing_unregistered_readings_total",
    "New readings from devices not in the catalog, billed under the default tariff.",
)
RETRIES = Counter("billing_store_retries_total", "Retries after a transient store failure.")
CACHE_DEFERRED = Counter(
    "billing_cache_deferred_total", "Redis updates deferred while it was down."
)
CACHE_STALE = Gauge(
    "billing_cache_stale_buckets", "Device-hours whose Redis snapshot awaits a refresh."
)


# Retried within cache_retry_s, then the slots are marked by the refresher instead.
CACHE_DOWN = RetryPolicy(0.1, 1.0, UNTIL_IT_SUCCEEDS)


class BillingHandler:
    """Records each reading exactly once and keeps the Redis snapshots in step.

    The consumer calls it with a batch; it returns once MongoDB holds the batch. While
    MongoDB is down it waits (UNTIL_IT_SUCCEEDS, counted in billing_store_retries_total):
    the one deliberate unbounded wait, so that nothing is acked before it is written.
    """

    def __init__(
        self,
        ledger: Ledger,
        cache: Cache,
        retry_max_delay_s: float,
        cache_retry_s: float,
        is_registered: Callable[[str], bool] = lambda device_id: True,
    ) -> None:
        self._ledger = ledger
        self._is_registered = is_registered
        self._cache = cache
        self._store_down = RetryPolicy(0.2, retry_max_delay_s, UNTIL_IT_SUCCEEDS)
        self._cache_retry_s = cache_retry_s
        self._stale: set[SlotKey] = set()
        CACHE_STALE.set_function(lambda: len(self._stale))

    async def __call__(self, readings: Sequence[Reading]) -> None:
        recorded = await retrying(
            lambda: self._ledger.record_batch(readings),
            operation="billing_store",
            policy=self._store_down,
            retry_on=(TransientFailure,),
            on_retry=RETRIES.inc,
            context={
                "readings": len(readings),
                "first_reading_id": readings[0].reading_id if readings else "",
            },
        )
        BILLED.inc(len(recorded.new))
        DUPLICATES.inc(recorded.duplicates)
        devices = {reading.device_id for reading in recorded.new}
        unregistered = {device for device in devices if not self._is_registered(device)}
        if unregistered:
            UNREGISTERED.inc(sum(1 for r in recorded.new if r.device_id in unregistered))
        await self._update_cache(recorded.slots, _latest_by_device(readings))

    async def _update_cache(self, slots: Collection[SlotKey], latest: list[Reading]) -> None:
        if self._stale:
            # Redis failed and the refresher has not caught up: don't make every batch
            # wait out the retry; the refresher marks these slots once Redis answers.
            CACHE_DEFERRED.inc(len(slots))
            self._stale.update(slots)
            return
        try:
            async with asyncio.timeout(self._cache_retry_s):  # the bound: then deferred
                await retrying(
                    lambda: self._cache.mark_changed(slots, latest),
                    operation="billing_cache",
                    policy=CACHE_DOWN,
                    retry_on=(TransientFailure,),
                )
        except (TransientFailure, TimeoutError) as error:
            log.warning(
                "Redis update deferred; MongoDB holds the readings",
                extra={"slots": len(slots), "error": str(error)},
            )
            CACHE_DEFERRED.inc(len(slots))
            self._stale.update(slots)

    async def refresh_stale(self, interval_s: float = 1.0) -> None:
        """Forever: mark the deferred slots changed, with the latest readings from MongoDB,
        once Redis answers."""
        while True:
            await asyncio.sleep(interval_s)
            for device_id, keys in _by_device(self._stale).items():
                # Taken out before marking: a batch that defers the same slot meanwhile
                # wrote after this mark began, so it must stay for the next round.
                self._stale.difference_update(keys)
                try:
                    latest = await self._ledger.latest(device_id)
                    await self._cache.mark_changed(keys, [latest] if latest else [])
                except TransientFailure:
                    self._stale.update(keys)
                    break  # still down; try again next round


def _by_device(slots: Collection[SlotKey]) -> dict[str, list[SlotKey]]:
    found: dict[str, list[SlotKey]] = {}
    for key in list(slots):
        found.setdefault(key.device_id, []).append(key)
    return found


def _latest_by_device(readings: Sequence[Reading]) -> list[Reading]:
    """Each device's latest reading of the batch (Redis keeps the newest anyway)."""
    latest: dict[str, Reading] = {}
    for reading in readings:
        current = latest.get(reading.device_id)
        if current is None or (reading.timestamp, reading.reading_id) > (
            current.timestamp,
            current.reading_id,
        ):
            latest[reading.device_id] = reading
    return list(latest.values())
