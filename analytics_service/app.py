"""Composition root of analytics_service: the consumer, the catalog, billed amounts, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from analytics_service.adapters.billing import BilledAmounts
from analytics_service.consumer import AnalyticsHandler
from analytics_service.domain.tally import Tally, Windows
from analytics_service.settings import AnalyticsSettings
from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.redis import RedisCache
from billing_service.domain.ledger import TransientFailure
from billing_service.queries import CatalogHolder
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
        windows = Windows(
            active_s=settings.active_window_s,
            silent_after_s=settings.silent_after_s,
            dedupe_s=settings.dedupe_window_s,
        )
        self.tally = Tally(windows, settings.dedupe_max_ids)
        # The tariff catalog is billing's; analytics reads it to tell registered devices
        # apart and to know which accounts to ask billing about.
        self._mongo = MongoLedger.connect(settings.mongodb_url, settings.mongodb_database, 5.0)
        self.catalog = CatalogHolder(MongoCatalog(self._mongo.database))
        self.billed = BilledAmounts(settings.billing_addr, timeout_s=10.0, tls=settings)
        self.consumer = ReadingConsumer(
            "analytics",
            settings.rabbitmq_url,
            topology,
            topology.analytics_queue,
            AnalyticsHandler(self.tally, self.catalog.is_registered, settings.top_n),
            settings.prefetch,
            settings.limits,
            # Handled one by one, acked once per batch: the ack frames were its top cost.
            batch_linger_s=settings.batch_linger_s,
        )
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._restore_last_seen()
        await self.consumer.start()
        self._background = [
            asyncio.create_task(self._catalog_forever()),
            asyncio.create_task(
                self.billed.refresh_forever(self._account_ids, self.settings.billed_refresh_s)
            ),
        ]
        log.info("analytics consuming", extra={"metrics_port": self.settings.metrics_port})

    async def _restore_last_seen(self) -> None:
        """Survive a restart: devices' last-seen times from the latest readings in Redis."""
        cache = RedisCache(self.settings.redis_url, self.settings.redis_key_prefix, 5.0)
        now, latest = datetime.now(UTC), {}
        try:
            latest = await cache.latest_timestamps()
        except TransientFailure as error:
            log.warning("Redis unavailable; activity starts empty", extra={"error": str(error)})
        finally:
            await cache.close()
        for device_id, timestamp in latest.items():
            self.tally.restore(device_id, (now - timestamp).total_seconds())
        log.info("device activity restored", extra={"devices": len(latest)})

    async def _catalog_forever(self) -> None:
        with contextlib.suppress(Exception):  # MongoDB not up yet: the loop below retries
            await self.catalog.refresh()
        await self.catalog.refresh_forever(self.settings.catalog_refresh_s)

    def _account_ids(self) -> list[str]:
        catalog = self.catalog.current
        return [account.id for account in catalog.accounts] if catalog else []

    async def stop(self) -> None:
        """Stop consuming first (in-flight readings get the grace), then the refreshers."""
        await self.consumer.stop(self.settings.shutdown_grace_s)
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.billed.close()
        self._mongo.close()


async def run(settings: AnalyticsSettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    await run_until_terminated(AnalyticsApp(settings))
