"""energy.v1.Billing: proto ⇄ domain, and query errors → gRPC status, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from billing_service.adapters.mongo_bills import IssuedBill
from billing_service.bill_messages import account_message, bill_message
from billing_service.domain.ledger import TransientFailure
from billing_service.domain.usage import InvalidQuery
from billing_service.queries import BillingQueries, NoCatalog, NotFound
from common.convert import reading_to_proto
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.errors import Reason, abort_with_reason
from common.models import MILLIWH_PER_KWH

log = logging.getLogger(__name__)
# Ids per message of the streaming RPCs: 5,000 ids of at most 128 bytes stay near 1 MB
# (the catalog's chunks hold as many device and account ids), far below gRPC's 4 MB limit.
STREAM_CHUNK = 5000


class BillingServicer(billing_pb2_grpc.BillingServicer):
    """The read API; the gateway forwards its public RPCs of the same names here."""

    def __init__(self, queries: BillingQueries) -> None:
        self._queries = queries

    async def GetLatestReading(
        self, request: billing_pb2.GetLatestReadingRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetLatestReadingResponse:
        async with _statuses(context):
            reading = await self._queries.latest(request.device_id)
        return billing_pb2.GetLatestReadingResponse(reading=reading_to_proto(reading))

    async def GetDeviceBill(
        self, request: billing_pb2.GetDeviceBillRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetDeviceBillResponse:
        async with _statuses(context):
            answer = await self._queries.device_bill(request.device_id, request.period)
        if answer.bill is None:  # issued: the stored bytes, exactly
            return billing_pb2.GetDeviceBillResponse(
                bill=billing_pb2.Bill.FromString(answer.issued)
            )
        message = bill_message(request.device_id, answer.bill)
        message.unregistered = answer.unregistered
        return billing_pb2.GetDeviceBillResponse(bill=message)

    async def GetAccountBill(
        self, request: billing_pb2.GetAccountBillRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetAccountBillResponse:
        async with _statuses(context):
            account = await self._queries.account_bill(request.account_id, request.period)
        if isinstance(account, IssuedBill):  # the stored bytes, exactly
            return billing_pb2.GetAccountBillResponse.FromString(account.response_bytes)
        return account_message(account)

    async def ListBills(
        self, request: billing_pb2.ListBillsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListBillsResponse:
        async with _statuses(context):
            bills, token = await self._queries.list_bills(
                request.account_id, request.page_size, request.page_token
            )
        return billing_pb2.ListBillsResponse(
            bills=[
                billing_pb2.GetAccountBillResponse.FromString(bill.response_bytes) for bill in bills
            ],
            next_page_token=token,
        )

    async def GetDeviceAccount(
        self, request: billing_pb2.GetDeviceAccountRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetDeviceAccountResponse:
        async with _statuses(context):
            account_id = self._queries.device_account(request.device_id)
        return billing_pb2.GetDeviceAccountResponse(
            device_id=request.device_id, account_id=account_id
        )

    async def GetAccount(
        self, request: billing_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetAccountResponse:
        async with _statuses(context):
            account, device_count = self._queries.account(request.account_id)
        return billing_pb2.GetAccountResponse(
            account_id=account.id, name=account.name, device_count=device_count
        )

    async def GetUsage(
        self, request: billing_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.GetUsageResponse:
        async with _statuses(context):
            for name in ("start", "end"):
                if not request.HasField(name):
                    raise InvalidQuery(f"{name} is missing; give a UTC timestamp")
            buckets = await self._queries.usage(
                request.device_id,
                _instant(request.start),
                _instant(request.end),
                request.window,
                request.time_zone,
            )
        response = billing_pb2.GetUsageResponse()
        for bucket in buckets:
            message = response.buckets.add(
                count=bucket.count,
                sum_kwh=bucket.sum_milliwh / MILLIWH_PER_KWH,
                avg_kwh=bucket.sum_milliwh / bucket.count / MILLIWH_PER_KWH if bucket.count else 0,
                min_kwh=bucket.min_milliwh / MILLIWH_PER_KWH,
                max_kwh=bucket.max_milliwh / MILLIWH_PER_KWH,
            )
            message.start.FromDatetime(bucket.start)
        return response

    async def ListReadings(
        self, request: billing_pb2.ListReadingsRequest, context: grpc.aio.ServicerContext
    ) -> billing_pb2.ListReadingsResponse:
        async with _statuses(context):
            readings, token = await self._queries.readings_page(
                request.device_id,
                _instant(request.start) if request.HasField("start") else None,
                _instant(request.end) if request.HasField("end") else None,
                request.page_size,
                request.page_token,
            )
        return billing_pb2.ListReadingsResponse(
            readings=[reading_to_proto(r) for r in readings], next_page_token=token
        )

    async def StreamCatalogIds(
        self, request: billing_pb2.StreamCatalogIdsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[billing_pb2.StreamCatalogIdsResponse]:
        async with _statuses(context):
            loaded_at, catalog = self._queries.catalog_snapshot()
        stamp = Timestamp()
        stamp.FromDatetime(loaded_at)
        if request.HasField("known_loaded_at") and request.known_loaded_at == stamp:
            yield billing_pb2.StreamCatalogIdsResponse(loaded_at=stamp, unchanged=True)
            return
        devices = [device.id for device in catalog.devices]
        accounts = [account.id for account in catalog.accounts]
        # range(..., 1) at least: the first chunk carries loaded_at even for an empty catalog
        for start in range(0, max(len(devices), len(accounts), 1), STREAM_CHUNK):
            yield billing_pb2.StreamCatalogIdsResponse(
                loaded_at=stamp,
                device_ids=devices[start : start + STREAM_CHUNK],
                account_ids=accounts[start : start + STREAM_CHUNK],
            )

    async def StreamLatestTimestamps(
        self,
        request: billing_pb2.StreamLatestTimestampsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[billing_pb2.StreamLatestTimestampsResponse]:
        async with _statuses(context):
            latest = list((await self._queries.latest_timestamps()).items())
        for start in range(0, len(latest), STREAM_CHUNK):
            response = billing_pb2.StreamLatestTimestampsResponse()
            for device_id, timestamp in latest[start : start + STREAM_CHUNK]:
                response.devices.add(device_id=device_id).timestamp.FromDatetime(timestamp)
            yield response


@asynccontextmanager
async def _statuses(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Expected query errors become a status with their message; nothing else is caught."""
    try:
        yield
    except InvalidQuery as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except NotFound as error:
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    except NoCatalog as error:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    except TransientFailure as error:
        log.warning("query failed: store unavailable", extra={"error": str(error)})
        await abort_with_reason(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"{error}; retry shortly",
            Reason.STORE_UNAVAILABLE,
            {"service": "billing"},
        )


def _instant(stamp: Timestamp) -> datetime:
    try:
        return stamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidQuery(f"timestamp seconds={stamp.seconds} is out of range") from None
