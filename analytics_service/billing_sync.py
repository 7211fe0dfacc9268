"""What analytics learns from billing's API, in the background: the catalog's ids, each
device's latest reading (to restore activity after a restart), and the accounts' bills.

Analytics starts and counts readings without billing; these arrive when billing answers.
Every failed call is counted in ``analytics_billing_sync_failures_total{rpc, kind}`` (kind:
the gRPC status, or the type of an unexpected error) and logged when its kind first appears,
not on every retry; the recovery is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

from prometheus_client import Counter, Gauge

from analytics_service.adapters.billing import BillingCallFailed, BillingClient
from analytics_service.domain.tally import Tally
from common.retry import UNTIL_IT_SUCCEEDS, WAIT_FOR_DEPENDENCY, RetryPolicy

log = logging.getLogger(__name__)

SYNC_FAILURES = Counter(
    "analytics_billing_sync_failures_total",
    "Failed calls of analytics to billing's API (catalog, latest readings, bills), by RPC and "
    "kind: the gRPC status code, or the error type of an unexpected failure.",
    ["rpc", "kind"],
)
BILLED = Gauge(
    "energy_billed_amount",
    "Month-to-date total of the accounts' bills (standing charges and tax included), by currency.",
    ["currency"],
)


class FailureLog:
    """One background task's failures: each counted, logged when its kind changes."""

    def __init__(self, rpc: str, what: str) -> None:
        self._rpc = rpc
        self._what = what
        self._kind: str | None = None

    def failed(self, error: Exception) -> None:
        expected = isinstance(error, BillingCallFailed)
        kind = error.code if isinstance(error, BillingCallFailed) else type(error).__name__
        SYNC_FAILURES.labels(self._rpc, kind).inc()
        if kind == self._kind:
            return
        self._kind = kind
        log.log(
            logging.WARNING if expected else logging.ERROR,
            "could not get %s from billing; retrying",
            self._what,
            extra={"rpc": self._rpc, "kind": kind, "error": str(error)},
            exc_info=None if expected else error,  # a bug: its traceback, once
        )

    def succeeded(self) -> None:
        if self._kind is not None:
            log.info("got %s from billing again", self._what, extra={"rpc": self._rpc})
            self._kind = None


class CatalogView:
    """The catalog's registered devices and accounts, as billing last sent them.

    Before the first answer no device is registered and there is no account, as when no
    catalog is stored. Each refresh replaces the whole view at once (the /metrics thread
    reads it).
    """

    def __init__(self) -> None:
        self.loaded_at: datetime | None = None
        self._devices: frozenset[str] = frozenset()
        self._accounts: tuple[str, ...] = ()

    def is_registered(self, device_id: str) -> bool:
        return device_id in self._devices

    def account_ids(self) -> list[str]:
        return list(self._accounts)

    async def refresh(self, billing: BillingClient) -> None:
        ids = await billing.catalog_ids(self.loaded_at)
        if ids is None:
            return  # billing holds the catalog this view was built from
        self._devices, self._accounts = ids.device_ids, ids.account_ids
        self.loaded_at = ids.loaded_at
        log.info(
            "tariff catalog received from billing",
            extra={"devices": len(ids.device_ids), "accounts": len(ids.account_ids)},
        )

    async def refresh_forever(self, billing: BillingClient, interval_s: float) -> None:
        """At once, then every ``interval_s``; after a failure sooner, backing off up to it."""
        failures = FailureLog("StreamCatalogIds", "the tariff catalog")
        policy = RetryPolicy(WAIT_FOR_DEPENDENCY.initial_s, interval_s, UNTIL_IT_SUCCEEDS)
        failed_in_a_row = 0
        while True:
            try:
                await self.refresh(billing)
            except Exception as error:  # counted and logged; the view is kept
                failures.failed(error)
                failed_in_a_row += 1
                delay_s = policy.delay_s(failed_in_a_row)
            else:
                failures.succeeded()
                failed_in_a_row = 0
                delay_s = interval_s
            await asyncio.sleep(delay_s)


async def restore_activity(billing: BillingClient, tally: Tally, give_up_after_s: float) -> int:
    """Seed the tally's last-seen times from the latest readings billing holds.

    Retried with backoff (0.5 s doubling up to 10 s, jittered: the shared
    ``WAIT_FOR_DEPENDENCY``) until billing answers; after ``give_up_after_s`` (the tally's
    forget horizon: anything restored later would be forgotten at once) it stops trying.
    Returns the number of devices restored. Readings counted meanwhile are newer and win.
    """
    failures = FailureLog("StreamLatestTimestamps", "the devices' latest readings")
    deadline = time.monotonic() + give_up_after_s
    attempt = 0
    while True:
        attempt += 1
        try:
            latest = await billing.latest_timestamps()
            break
        except Exception as error:  # counted and logged, then retried
            failures.failed(error)
            if time.monotonic() >= deadline:
                log.warning("gave up restoring device activity; it starts empty")
                return 0
            await asyncio.sleep(WAIT_FOR_DEPENDENCY.delay_s(attempt))
    failures.succeeded()
    now = datetime.now(UTC)
    for device_id, timestamp in latest.items():
        tally.restore(device_id, (now - timestamp).total_seconds())
    log.info("device activity restored", extra={"devices": len(latest)})
    return len(latest)


class BilledAmounts:
    """Polls GetAccountBill for every account of the catalog and sums totals by currency."""

    def __init__(self, billing: BillingClient) -> None:
        self._billing = billing

    async def refresh(self, account_ids: list[str]) -> None:
        totals: dict[str, Decimal] = {}
        for account_id in account_ids:
            answer = await self._billing.account_total(account_id)
            if answer is not None:
                currency, total = answer
                totals[currency] = totals.get(currency, Decimal(0)) + total
        for currency, total in totals.items():
            BILLED.labels(currency).set(float(total))

    async def refresh_forever(self, accounts: Callable[[], list[str]], interval_s: float) -> None:
        """Every interval: the accounts come from ``accounts()``; failures keep the last values."""
        failures = FailureLog("GetAccountBill", "the billed amounts")
        while True:
            try:
                await self.refresh(accounts())
            except Exception as error:  # counted and logged; the gauges are kept
                failures.failed(error)
            else:
                failures.succeeded()
            await asyncio.sleep(interval_s)
