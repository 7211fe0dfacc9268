"""Composition root of billing_service: MongoDB, Redis, the consumer, gRPC health, metrics,
and the loop that closes billing periods (issues bills)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from pathlib import Path

from billing_service.adapters.faults import FaultyLedger
from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.mongo_bills import MongoBillStore
from billing_service.adapters.redis import RedisCache
from billing_service.api import BillingServicer
from billing_service.closing import BillCloser, DeviceBiller, ledger_slot_energy
from billing_service.consumer import BillingHandler
from billing_service.domain.ledger import Ledger, TransientFailure
from billing_service.domain.tariff import CatalogError
from billing_service.queries import BillingQueries, CatalogHolder
from billing_service.settings import BillingSettings
from common.consumer import ReadingConsumer
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.grpc_server import GrpcServer, run_until_terminated
from common.metrics import serve_metrics
from common.rabbit import Topology
from common.retry import WAIT_FOR_DEPENDENCY, retrying
from common.tls import server_credentials

log = logging.getLogger(__name__)
SERVICE_NAME = billing_pb2.DESCRIPTOR.services_by_name["Billing"].full_name


class BillingApp:
    """Wires the ledger and cache into the handler and the handler into the consumer."""

    def __init__(self, settings: BillingSettings) -> None:
        self.settings = settings
        topology = Topology(settings.topology_prefix)
        self.ledger = MongoLedger.connect(
            settings.mongodb_url, settings.mongodb_database, settings.mongodb_timeout_s
        )
        self.cache = RedisCache(
            settings.redis_url, settings.redis_key_prefix, settings.redis_timeout_s
        )
        self.bills = MongoBillStore(self.ledger.database)
        self.catalog = CatalogHolder(MongoCatalog(self.ledger.database), self.bills)
        writes: Ledger = self.ledger
        if settings.faults_file:
            log.warning("MongoDB fault injection is on", extra={"file": settings.faults_file})
            writes = FaultyLedger(self.ledger, Path(settings.faults_file))
        self.handler = BillingHandler(
            writes,
            self.cache,
            settings.retry_max_delay_s,
            settings.cache_retry_s,
            self.catalog.is_registered,
        )
        self.consumer = ReadingConsumer(
            "billing",
            settings.rabbitmq_url,
            topology,
            topology.billing_queue,
            self.handler,
            settings.prefetch,
            settings.limits,
            batch_size=settings.batch_size,
            batch_linger_s=settings.batch_linger_s,
        )
        self.grpc = GrpcServer([SERVICE_NAME])
        self.queries = BillingQueries(
            self.ledger, self.cache, self.catalog, settings.max_usage_buckets, bills=self.bills
        )
        self.closer = BillCloser(
            DeviceBiller(ledger_slot_energy(self.ledger), self.ledger.late_writes),
            self.bills,
            self.catalog.require,
        )
        billing_pb2_grpc.add_BillingServicer_to_server(
            BillingServicer(self.queries), self.grpc.server
        )
        self._background: list[asyncio.Task[None]] = []
        self.port = 0

    async def start(self) -> None:
        await retrying(
            self._prepare_store,
            operation="mongodb_prepare",
            policy=WAIT_FOR_DEPENDENCY,
            retry_on=(TransientFailure,),
        )
        await self.consumer.start()
        self._background = [
            asyncio.create_task(self.handler.refresh_stale()),
            asyncio.create_task(self.catalog.refresh_forever(self.settings.catalog_refresh_s)),
        ]
        if self.settings.close_check_interval_s > 0:  # 0: only `make close-period` closes
            self._background.append(
                asyncio.create_task(
                    self.closer.close_forever(
                        self.settings.close_check_interval_s,
                        timedelta(hours=self.settings.close_grace_hours),
                    )
                )
            )
        self.port = await self.grpc.start(
            self.settings.host, self.settings.port, server_credentials(self.settings)
        )
        log.info("billing consuming", extra={"port": self.port})

    async def _prepare_store(self) -> None:
        await self.ledger.ensure_indexes()
        await self.ledger.migrate_layout()
        try:
            await self.catalog.refresh()
        except CatalogError as error:  # refused (it would change a closed period): say so
            log.error(
                "refused the stored tariff catalog; no catalog until a valid one is stored",
                extra={"problems": str(error)},
            )

    async def stop(self) -> None:
        """NOT_SERVING and no new deliveries at once; in-flight reads and writes get the grace."""
        await asyncio.gather(
            self.grpc.stop(self.settings.shutdown_grace_s),
            self.consumer.stop(self.settings.shutdown_grace_s),
        )
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.cache.close()
        self.ledger.close()


async def run(settings: BillingSettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    await run_until_terminated(BillingApp(settings))
