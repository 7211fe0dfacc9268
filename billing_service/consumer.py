"""Billing a reading: MongoDB first (retried until it succeeds), then the Redis snapshot.

The shared consumer acks only after this returns, so an ack always follows a write that
MongoDB acknowledged. Redis is a cache: when it is down, billing goes on and the affected
snapshots are refreshed from MongoDB once Redis answers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from billing_service.domain.ledger import Cache, Ledger, SlotKey, Total, TransientFailure
from common.models import Reading

log = logging.getLogger(__name__)

READINGS = Counter("billing_readings_total", "Readings recorded, by result.", ["result"])
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


class BillingHandler:
    """Records each reading exactly once and keeps the Redis snapshots in step."""

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
        self._retry_max_delay_s = retry_max_delay_s
        self._cache_retry_s = cache_retry_s
        self._stale: set[SlotKey] = set()
        CACHE_STALE.set_function(lambda: len(self._stale))

    async def __call__(self, reading: Reading) -> None:
        recorded = None
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TransientFailure),
            wait=wait_random_exponential(multiplier=0.2, max=self._retry_max_delay_s),
            before_sleep=_log_retry(reading),
        ):
            with attempt:
                recorded = await self._ledger.record(reading)
        assert recorded is not None
        READINGS.labels("duplicate" if recorded.duplicate else "billed").inc()
        if not recorded.duplicate and not self._is_registered(reading.device_id):
            UNREGISTERED.inc()
        await self._update_cache(reading, recorded.total)

    async def _update_cache(self, reading: Reading, total: Total) -> None:
        key = SlotKey.of(reading)
        if self._stale:
            # Redis failed and the refresher has not caught up: don't make every reading
            # wait out the retry; the refresher rewrites this bucket from MongoDB.
            CACHE_DEFERRED.inc()
            self._stale.add(key)
            return
        try:
            async with asyncio.timeout(self._cache_retry_s):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(TransientFailure),
                    wait=wait_random_exponential(multiplier=0.1, max=1.0),
                ):
                    with attempt:
                        await self._cache.put_slot_total(key, total)
                        await self._cache.put_latest(reading)
        except (TransientFailure, TimeoutError) as error:
            log.warning(
                "Redis update deferred; MongoDB holds the reading",
                extra={"reading_id": reading.reading_id, "error": str(error)},
            )
            CACHE_DEFERRED.inc()
            self._stale.add(key)

    async def refresh_stale(self, interval_s: float = 1.0) -> None:
        """Forever: rewrite deferred Redis snapshots from MongoDB once Redis answers."""
        while True:
            await asyncio.sleep(interval_s)
            for key in list(self._stale):
                try:
                    await self._cache.put_slot_total(key, await self._ledger.slot_total(key))
                    latest = await self._ledger.latest(key.device_id)
                    if latest is not None:
                        await self._cache.put_latest(latest)
                except TransientFailure:
                    break  # still down; try again next round
                self._stale.discard(key)


def _log_retry(reading: Reading) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        RETRIES.inc()
        log.warning(
            "store unavailable, retrying",
            extra={
                "reading_id": reading.reading_id,
                "attempt": state.attempt_number,
                "error": str(state.outcome.exception()) if state.outcome else "",
            },
        )

    return before_sleep
