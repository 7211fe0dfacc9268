"""Composition root of ingestion_service: publisher, gRPC server, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health_pb2

from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.grpc_server import GrpcServer, run_until_terminated
from common.metrics import serve_metrics
from common.rabbit import Topology
from common.tls import server_credentials
from ingestion_service.adapters.rabbit import RabbitPublisher
from ingestion_service.api import IngestionServicer
from ingestion_service.settings import IngestionSettings

log = logging.getLogger(__name__)
SERVICE_NAME = ingestion_pb2.DESCRIPTOR.services_by_name["Ingestion"].full_name
CLOSE_TIMEOUT_S = 5.0


class IngestionApp:
    """Wires the publisher into the servicer; ``start`` and ``stop`` for tests and main."""

    def __init__(self, settings: IngestionSettings) -> None:
        self.settings = settings
        self.publisher = RabbitPublisher(
            settings.rabbitmq_url,
            Topology(settings.topology_prefix),
            settings.confirm_timeout_s,
            settings.max_in_flight_readings,
            settings.message_schema,
            settings.max_message_readings,
        )
        self.grpc = GrpcServer([SERVICE_NAME])
        ingestion_pb2_grpc.add_IngestionServicer_to_server(
            IngestionServicer(self.publisher, settings.limits), self.grpc.server
        )
        self.port = 0
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publisher.start()
        self.port = await self.grpc.start(
            self.settings.host, self.settings.port, server_credentials(self.settings)
        )
        self._health_task = asyncio.create_task(self._report_broker_health())
        log.info("ingestion listening", extra={"port": self.port})

    async def _report_broker_health(self, interval_s: float = 0.5) -> None:
        """SERVING only while RabbitMQ is connected and not blocking: a publish would fail."""
        serving = None
        while True:
            accepting = await self.publisher.accepting()
            if accepting != serving:
                serving = accepting
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if serving
                    else (health_pb2.HealthCheckResponse.NOT_SERVING)
                )
                for name in ("", SERVICE_NAME):
                    await self.grpc.health.set(name, status)
                log.info("broker connection changed", extra={"connected": serving})
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        """NOT_SERVING and no new RPCs at once; in-flight publishes get the grace, then the
        AMQP connection is closed (bounded, so a broker that is down cannot hold the exit)."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.grpc.stop(self.settings.shutdown_grace_s)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.publisher.close()
        except Exception:  # nothing unconfirmed is left: every RPC has finished by now
            log.warning("could not close the RabbitMQ connection cleanly", exc_info=True)


async def run(settings: IngestionSettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    await run_until_terminated(IngestionApp(settings))
