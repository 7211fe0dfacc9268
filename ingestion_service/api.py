"""energy.v1.Ingestion: proto → domain, publish, broker errors → gRPC status."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import grpc

from common.convert import reading_from_proto
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.models import InvalidReading, Limits
from ingestion_service.adapters.rabbit import (
    BrokerRefused,
    BrokerUnavailable,
    ConfirmTimeout,
    RabbitPublisher,
)

log = logging.getLogger(__name__)


class IngestionServicer(ingestion_pb2_grpc.IngestionServicer):
    """Re-validates (nothing invalid may reach the broker) and publishes with confirms."""

    def __init__(self, publisher: RabbitPublisher, limits: Limits) -> None:
        self._publisher = publisher
        self._limits = limits

    async def Publish(
        self, request: ingestion_pb2.PublishRequest, context: grpc.aio.ServicerContext
    ) -> ingestion_pb2.PublishResponse:
        now = datetime.now(UTC)
        try:
            readings = [
                reading_from_proto(message, now=now, limits=self._limits)
                for message in request.readings
            ]
        except InvalidReading as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if not readings:
            return ingestion_pb2.PublishResponse(published=0)
        try:
            await self._publisher.publish(readings)
        except BrokerUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        except ConfirmTimeout as error:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
        except BrokerRefused as error:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        return ingestion_pb2.PublishResponse(published=len(readings))
