"""Composition root of api_gateway: ingestion client, public gRPC server, metrics."""

from __future__ import annotations

import logging

from api_gateway.adapters.billing import BillingClient
from api_gateway.adapters.ingestion import IngestionClient
from api_gateway.api import GatewayServicer
from api_gateway.settings import GatewaySettings
from common.energy.v1 import gateway_pb2, gateway_pb2_grpc
from common.grpc_server import GrpcServer, wait_for_termination_signal
from common.metrics import serve_metrics
from common.tls import server_credentials

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class GatewayApp:
    """Wires the ingestion client into the servicer; ``start`` and ``stop`` for tests and main."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.ingestion = IngestionClient(
            settings.ingestion_addr, settings.ingestion_timeout_s, tls=settings
        )
        self.billing = BillingClient(
            settings.billing_addr, settings.billing_timeout_s, tls=settings
        )
        self.grpc = GrpcServer([SERVICE_NAME], max_message_bytes=settings.max_message_bytes)
        servicer = GatewayServicer(
            self.ingestion,
            self.billing,
            settings.limits,
            settings.batch_size,
            settings.max_reported_rejections,
        )
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, self.grpc.server)
        self.port = 0

    async def start(self) -> None:
        self.port = await self.grpc.start(
            self.settings.host, self.settings.port, server_credentials(self.settings)
        )
        log.info("gateway listening", extra={"port": self.port})

    async def stop(self) -> None:
        await self.grpc.stop(self.settings.shutdown_grace_s)
        await self.ingestion.close()
        await self.billing.close()


async def run(settings: GatewaySettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    app = GatewayApp(settings)
    await app.start()
    await wait_for_termination_signal()
    await app.stop()
