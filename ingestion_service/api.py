"""energy.v1.Ingestion: proto → domain, publish, broker errors → gRPC status and reason."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import grpc

from common.convert import reading_from_proto
from common.energy.v1 import ingestion_pb2, ingestion_pb2_grpc
from common.errors import Reason, abort_with_reason
from common.models import InvalidReading, Limits
from ingestion_service.adapters.rabbit import (
    BrokerBlocked,
    BrokerRefused,
    BrokerUnavailable,
    ConfirmTimeout,
    IngestionBusy,
    NoQueueBound,
    RabbitPublisher,
)

log = logging.getLogger(__name__)

# Each broker failure's status and reason code, most specific class first (the first
# match wins): the gateway decides from the reason, the caller reads the message.
BROKER_ERRORS: tuple[tuple[type[Exception], grpc.StatusCode, Reason], ...] = (
    (IngestionBusy, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.INGESTION_BUSY),
    (BrokerBlocked, grpc.StatusCode.UNAVAILABLE, Reason.BROKER_BLOCKED),
    (BrokerUnavailable, grpc.StatusCode.UNAVAILABLE, Reason.BROKER_UNAVAILABLE),
    (ConfirmTimeout, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.CONFIRM_TIMEOUT),
    (NoQueueBound, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.NO_QUEUE_BOUND),
    (BrokerRefused, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL),
)
_BROKER_ERROR_TYPES = tuple(kind for kind, _, _ in BROKER_ERRORS)


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
            await abort_with_reason(
                context, grpc.StatusCode.INVALID_ARGUMENT, str(error), Reason.INVALID_READING
            )
        if not readings:
            return ingestion_pb2.PublishResponse(published=0)
        try:
            await self._publisher.publish(readings)
        except _BROKER_ERROR_TYPES as error:
            code, reason = next((c, r) for kind, c, r in BROKER_ERRORS if isinstance(error, kind))
            retry_after_s = error.retry_after_s if isinstance(error, IngestionBusy) else None
            # A busy refusal is routine under load and comes thousands a second: counted
            # (ingestion_publish_failures_total{reason="busy"}), logged at debug only.
            log.log(
                logging.DEBUG if reason == Reason.INGESTION_BUSY else logging.WARNING,
                "publish failed",
                extra={"reason": reason.value, "readings": len(readings), "error": str(error)},
            )
            await abort_with_reason(context, code, str(error), reason, retry_after_s=retry_after_s)
        # Debug only: calls come thousands a second; the failures above are warnings.
        log.debug(
            "published",
            extra={"readings": len(readings), "first_reading_id": readings[0].reading_id},
        )
        return ingestion_pb2.PublishResponse(published=len(readings))
