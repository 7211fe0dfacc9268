"""energy.v1.Gateway: validation, batching, and upstream errors → gRPC status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from prometheus_client import Counter

from api_gateway.adapters.billing import BillingClient
from api_gateway.adapters.ingestion import IngestionClient
from common.convert import reading_from_proto
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc
from common.models import InvalidReading, Limits, Reading

log = logging.getLogger(__name__)

READINGS_ACCEPTED = Counter("gateway_readings_accepted_total", "Readings confirmed upstream.")
READINGS_REJECTED = Counter(
    "gateway_readings_rejected_total", "Readings rejected by validation, by field.", ["field"]
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Validates every reading; forwards valid ones and answers only after ingestion did."""

    def __init__(
        self,
        ingestion: IngestionClient,
        billing: BillingClient,
        limits: Limits,
        batch_size: int,
        max_reported_rejections: int,
    ) -> None:
        self._ingestion = ingestion
        self._billing = billing
        self._limits = limits
        self._batch_size = batch_size
        self._max_reported_rejections = max_reported_rejections

    async def SendReading(
        self, request: gateway_pb2.SendReadingRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SendReadingResponse:
        try:
            reading = self._validate(request)
        except InvalidReading as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        await self._forward([reading], context, accepted_before=None)
        return gateway_pb2.SendReadingResponse(reading_id=reading.reading_id)

    async def SendReadings(
        self,
        request_iterator: AsyncIterator[gateway_pb2.SendReadingRequest],
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.SendReadingsResponse:
        response = gateway_pb2.SendReadingsResponse()
        rejected_count = 0
        batch: list[Reading] = []
        index = 0
        async for request in request_iterator:
            try:
                batch.append(self._validate(request))
            except InvalidReading as error:
                rejected_count += 1
                if rejected_count <= self._max_reported_rejections:
                    response.rejected.add(
                        index=index, device_id=request.reading.device_id[:128], reason=str(error)
                    )
            if len(batch) >= self._batch_size:
                await self._forward(batch, context, accepted_before=response.accepted)
                response.accepted += len(batch)
                batch = []
            index += 1
        if batch:
            await self._forward(batch, context, accepted_before=response.accepted)
            response.accepted += len(batch)
        response.rejected_count = rejected_count
        return response

    def _validate(self, request: gateway_pb2.SendReadingRequest) -> Reading:
        try:
            if not request.HasField("reading"):
                raise InvalidReading("reading", "is missing; put the reading in the request")
            return reading_from_proto(request.reading, now=datetime.now(UTC), limits=self._limits)
        except InvalidReading as error:
            READINGS_REJECTED.labels(error.field).inc()
            raise

    async def _forward(
        self,
        readings: list[Reading],
        context: grpc.aio.ServicerContext,
        accepted_before: int | None,
    ) -> None:
        try:
            await self._ingestion.publish(readings)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            details = error.details() or code.name
            if code == grpc.StatusCode.UNAVAILABLE and "RabbitMQ" not in details:
                details = f"ingestion service unreachable ({details}); retry shortly"
            if accepted_before is not None:
                details += (
                    f". {accepted_before} readings of this stream were accepted before the "
                    "failure; resend the stream: accepted readings are deduplicated by reading_id"
                )
            log.warning("forward to ingestion failed", extra={"code": code.name, "error": details})
            await context.abort(code, details)
        READINGS_ACCEPTED.inc(len(readings))

    async def GetLatestReading(
        self, request: billing_pb2.GetLatestReadingRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetLatestReadingResponse:
        return await self._ask_billing("GetLatestReading", request, context)

    async def GetDeviceBill(
        self, request: billing_pb2.GetDeviceBillRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetDeviceBillResponse:
        return await self._ask_billing("GetDeviceBill", request, context)

    async def GetAccountBill(
        self, request: billing_pb2.GetAccountBillRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetAccountBillResponse:
        return await self._ask_billing("GetAccountBill", request, context)

    async def GetUsage(
        self, request: billing_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetUsageResponse:
        return await self._ask_billing("GetUsage", request, context)

    async def ListReadings(
        self, request: billing_pb2.ListReadingsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListReadingsResponse:
        return await self._ask_billing("ListReadings", request, context)

    async def _ask_billing(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        """Forward a read RPC to billing_service; its status and message reach the caller."""
        try:
            return await self._billing.call(method, request)
        except grpc.aio.AioRpcError as error:
            code, details = error.code(), error.details() or error.code().name
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"billing service unreachable ({details}); retry shortly"
            await context.abort(code, details)
