"""Composition root of analytics_service: the consumer, billing's API, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from analytics_service.adapters.billing import BillingClient
from analytics_service.billing_sync import BilledAmounts, CatalogView, restore_activity
from analytics_service.consumer import AnalyticsHandler
from analytics_service.domain.demand import FleetDemand
from analytics_service.domain.tally import Tally, Windows
from analytics_service.settings import AnalyticsSettings
from common.consumer import ReadingConsumer
from common.grpc_server import run_until_terminated
from common.metrics import serve_metrics
from common.rabbit import Topology

log = logging.getLogger(__name__)


class AnalyticsApp:
    """Wires the tally into the consumer; ``start`` and ``stop`` for tests and main."""

    def __init__(self, settings: AnalyticsSettings) -> None:
        self.settings = settings
        topology = Topology(settings.topology_prefix)
        self.windows = Windows(
            active_s=settings.active_window_s,
            silent_after_s=settings.silent_after_s,
            dedupe_s=settings.dedupe_window_s,
        )
        self.tally = Tally(self.windows, settings.dedupe_max_ids)
        # Not restored from billing (only device activity is): empty until readings come.
        self.demand = FleetDemand()
        # Everything analytics knows of billing comes through billing's gRPC API: which
        # devices are registered, which accounts to sum, each device's latest reading.
        self.billing = BillingClient(settings.billing_addr, settings.billing_timeout_s, settings)
        self.catalog = CatalogView()
        self.billed = BilledAmounts(self.billing)
        self.consumer = ReadingConsumer(
            "analytics",
            settings.rabbitmq_url,
            topology,
            topology.analytics_queue,
            AnalyticsHandler(self.tally, self.demand, self.catalog.is_registered, settings.top_n),
            settings.prefetch,
            settings.limits,
            # Counted one by one, acked once per batch: the ack frames were its top cost.
            batch_size=settings.batch_size,
            batch_linger_s=settings.batch_linger_s,
        )
        self._background: list[asyncio.Task[object]] = []

    async def start(self) -> None:
        """Consume at once; activity and the catalog arrive when billing answers (retried)."""
        await self.consumer.start()
        settings = self.settings
        self._background = [
            asyncio.create_task(
                restore_activity(self.billing, self.tally, self.windows.forget_after_s)
            ),
            asyncio.create_task(
                self.catalog.refresh_forever(self.billing, settings.catalog_refresh_s)
            ),
            asyncio.create_task(
                self.billed.refresh_forever(self.catalog.account_ids, settings.billed_refresh_s)
            ),
        ]
        log.info("analytics consuming", extra={"metrics_port": self.settings.metrics_port})

    async def stop(self) -> None:
        """Stop consuming first (in-flight readings get the grace), then the refreshers."""
        await self.consumer.stop(self.settings.shutdown_grace_s)
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.billing.close()


async def run(settings: AnalyticsSettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    await run_until_terminated(AnalyticsApp(settings))
