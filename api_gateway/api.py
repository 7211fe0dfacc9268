"""energy.v1.Gateway: validation, batching, and upstream errors → gRPC status.

A stream's readings are forwarded in chunks of ``batch_size``; single ``SendReading`` calls
are gathered into batches by ``api_gateway.batcher`` after each call's own checks. What is
forwarded is the caller's own proto, validated and stamped with its reading id: rebuilding
it from the domain reading cost about a fifth of the gateway's CPU per streamed reading.

Who calls is settled before a handler runs (``api_gateway.identity``); the read RPCs are
rows of ``api_gateway.reads.READS``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime

import grpc
from prometheus_client import Counter

from api_gateway.adapters.billing import BillingClient
from api_gateway.adapters.credentials import (
    CredentialStoreUnavailable,
    MongoCredentialStore,
    NoToken,
    TokenExists,
)
from api_gateway.adapters.ingestion import IngestionClient
from api_gateway.auth import ROTATE_RPC, Principal, Subject, TokenKind
from api_gateway.batcher import BatcherClosed, UnaryBatcher
from api_gateway.guard import Guard
from api_gateway.identity import caller
from api_gateway.reads import READS, ReadForwarder
from api_gateway.upstream import abort_upstream_failure
from common.convert import reading_from_proto
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.errors import Reason, reason_of
from common.models import ID_PATTERN, ID_RULE, InvalidReading, Limits

log = logging.getLogger(__name__)

READINGS_ACCEPTED = Counter("gateway_readings_accepted_total", "Readings confirmed upstream.")
READINGS_REJECTED = Counter(
    "gateway_readings_rejected_total", "Readings rejected by validation, by field.", ["field"]
)
READINGS_NOT_FORWARDED = Counter(
    "gateway_readings_not_forwarded_total",
    "Readings ingestion did not take, by its reason (INGESTION_BUSY: refused at once, with a "
    "retry hint, because too many readings wait for confirms).",
    ["reason"],
)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Validates every reading; forwards valid ones and answers only after ingestion did."""

    def __init__(
        self,
        ingestion: IngestionClient,
        unary: UnaryBatcher,
        billing: BillingClient,
        guard: Guard,
        limits: Limits,
        batch_size: int,
        max_reported_rejections: int,
        max_stream_readings: int,
    ) -> None:
        self._ingestion = ingestion
        self._unary = unary
        self._guard = guard
        self._limits = limits
        self._batch_size = batch_size
        self._max_reported_rejections = max_reported_rejections
        self._max_stream_readings = max_stream_readings
        reads = ReadForwarder(billing, guard)
        for read in READS:  # shadows the generated base's UNIMPLEMENTED method
            setattr(self, read.method, reads.handler(read))

    async def SendReading(
        self, request: gateway_pb2.SendReadingRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.SendReadingResponse:
        principal = caller()
        await self._guard.require_sender(principal, context)
        try:
            if request.readings:
                READINGS_REJECTED.labels("readings").inc(len(request.readings))
                raise InvalidReading(
                    "readings",
                    "SendReading takes one reading, in `reading`; send several on SendReadings, "
                    "where one stream message may carry them all in `readings`",
                )
            reading = self._validate(
                request.reading if request.HasField("reading") else None, datetime.now(UTC)
            )
        except InvalidReading as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        # Who may send and how fast is decided per call, before the reading joins a batch.
        await self._guard.require_device(principal, reading.device_id, context)
        await self._guard.admit(principal, [reading], context)
        try:
            await self._forward(self._unary.send(reading), [reading], context, None)
        except BatcherClosed as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return gateway_pb2.SendReadingResponse(reading_id=reading.reading_id)

    async def SendReadings(
        self,
        request_iterator: AsyncIterator[gateway_pb2.SendReadingRequest],
        context: grpc.aio.ServicerContext,
    ) -> gateway_pb2.SendReadingsResponse:
        principal = caller()
        await self._guard.require_sender(principal, context)
        response = gateway_pb2.SendReadingsResponse()
        rejected_count = 0
        batch: list[reading_pb2.Reading] = []
        index = 0  # of the next reading in the stream, over every message's readings

        def reject(device_id: str, error: InvalidReading, readings: int = 1) -> None:
            nonlocal rejected_count
            rejected_count += readings
            if len(response.rejected) < self._max_reported_rejections:
                response.rejected.add(index=index, device_id=device_id[:128], reason=str(error))

        async for request in request_iterator:
            try:
                protos = _readings_of(request)
            except InvalidReading as error:
                readings = len(request.readings) + 1
                reject(request.reading.device_id, error, readings)
                index += readings
                continue
            now = datetime.now(UTC)  # once per message: its readings arrived together
            for proto in protos:
                if index >= self._max_stream_readings:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"a stream carries at most {self._max_stream_readings} readings "
                        f"(GATEWAY_MAX_STREAM_READINGS); open a new stream for the rest"
                        + _accepted_note(response.accepted),
                    )
                try:
                    reading = self._validate(proto, now)
                except InvalidReading as error:
                    reject(proto.device_id if proto is not None else "", error)
                else:
                    if not principal.may_act_for(reading.device_id):  # no await per reading
                        await self._guard.require_device(
                            principal, reading.device_id, context, _accepted_note(response.accepted)
                        )
                    batch.append(reading)
                    if len(batch) >= self._batch_size:
                        await self._send_batch(principal, batch, context, response)
                        batch = []
                index += 1
        if batch:
            await self._send_batch(principal, batch, context, response)
        response.rejected_count = rejected_count
        return response

    async def _send_batch(
        self,
        principal: Principal,
        batch: list[reading_pb2.Reading],
        context: grpc.aio.ServicerContext,
        response: gateway_pb2.SendReadingsResponse,
    ) -> None:
        await self._guard.admit(principal, batch, context, _accepted_note(response.accepted))
        await self._forward(
            self._ingestion.publish(batch), batch, context, accepted_before=response.accepted
        )
        response.accepted += len(batch)

    def _validate(self, proto: reading_pb2.Reading | None, now: datetime) -> reading_pb2.Reading:
        """``proto`` once valid, with its reading id set (derived when the caller left it
        empty): the reading as it is forwarded."""
        try:
            if proto is None:
                raise InvalidReading("reading", "is missing; put the reading in the request")
            reading = reading_from_proto(proto, now=now, limits=self._limits)
        except InvalidReading as error:
            READINGS_REJECTED.labels(error.field).inc()
            raise
        # The rest of the domain reading is the proto's own fields, in UTC already.
        proto.reading_id = reading.reading_id
        return proto

    async def _forward(
        self,
        publish: Awaitable[None],
        readings: list[reading_pb2.Reading],
        context: grpc.aio.ServicerContext,
        accepted_before: int | None,
    ) -> None:
        """Await ``publish`` of ``readings``; an upstream failure becomes this call's answer."""
        try:
            await publish
        except grpc.aio.AioRpcError as error:
            reason = reason_of(error)
            READINGS_NOT_FORWARDED.labels(reason.value if reason else "UNKNOWN").inc(len(readings))
            note = _accepted_note(accepted_before) if accepted_before is not None else ""
            # Busy refusals are routine under load (thousands a second): counted, not logged.
            logged = reason != Reason.INGESTION_BUSY
            await abort_upstream_failure(context, "ingestion", error, note, log_failure=logged)
        READINGS_ACCEPTED.inc(len(readings))
        # Debug only: readings come thousands a second; failures are warnings.
        log.debug(
            "forwarded",
            extra={"readings": len(readings), "first_reading_id": readings[0].reading_id},
        )


def _readings_of(
    request: gateway_pb2.SendReadingRequest,
) -> Sequence[reading_pb2.Reading | None]:
    """A stream message's readings: ``readings``, or ``reading`` (None when it has neither,
    which validation rejects as missing)."""
    if not request.readings:
        return [request.reading if request.HasField("reading") else None]
    if request.HasField("reading"):
        error = InvalidReading(
            "reading",
            f"is set along with `readings` ({len(request.readings)}); a message carries one "
            "or the other, so none of its readings was taken: resend them all in `readings`",
        )
        READINGS_REJECTED.labels(error.field).inc(len(request.readings) + 1)
        raise error
    return request.readings


def _accepted_note(accepted: int) -> str:
    return (
        f". {accepted} readings of this stream were accepted before the failure; resend the "
        "stream: accepted readings are deduplicated by reading_id"
    )


class DeviceAdminServicer(gateway_pb2_grpc.DeviceAdminServicer):
    """Issue, rotate and revoke device and account tokens; every call needs the admin token,
    which ``api_gateway.identity.AuthInterceptor`` checks before a handler runs. An account
    token is issued (or rotated) only for an account billing's catalog lists."""

    def __init__(self, store: MongoCredentialStore, billing: BillingClient) -> None:
        self._store = store
        self._billing = billing

    async def RegisterDevice(
        self, request: gateway_pb2.RegisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeviceTokenResponse:
        subject = await self._checked(TokenKind.DEVICE, request.device_id, context)
        token = await self._register(subject, context)
        return gateway_pb2.DeviceTokenResponse(device_id=subject.id, token=token)

    async def RotateDeviceToken(
        self, request: gateway_pb2.RotateDeviceTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.DeviceTokenResponse:
        subject = await self._checked(TokenKind.DEVICE, request.device_id, context)
        token = await self._rotate(subject, context)
        return gateway_pb2.DeviceTokenResponse(device_id=subject.id, token=token)

    async def RevokeDevice(
        self, request: gateway_pb2.RevokeDeviceRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RevokeDeviceResponse:
        subject = await self._checked(TokenKind.DEVICE, request.device_id, context)
        await self._revoke(subject, context)
        return gateway_pb2.RevokeDeviceResponse(device_id=subject.id)

    async def IssueAccountToken(
        self, request: gateway_pb2.IssueAccountTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AccountTokenResponse:
        subject = await self._checked(TokenKind.ACCOUNT, request.account_id, context)
        await self._require_catalog_account(subject.id, context)
        token = await self._register(subject, context)
        return gateway_pb2.AccountTokenResponse(account_id=subject.id, token=token)

    async def RotateAccountToken(
        self, request: gateway_pb2.RotateAccountTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.AccountTokenResponse:
        subject = await self._checked(TokenKind.ACCOUNT, request.account_id, context)
        await self._require_catalog_account(subject.id, context)
        token = await self._rotate(subject, context)
        return gateway_pb2.AccountTokenResponse(account_id=subject.id, token=token)

    async def RevokeAccountToken(
        self, request: gateway_pb2.RevokeAccountTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RevokeAccountTokenResponse:
        # No catalog check: a token of an account gone from the catalog must stay revocable.
        subject = await self._checked(TokenKind.ACCOUNT, request.account_id, context)
        await self._revoke(subject, context)
        return gateway_pb2.RevokeAccountTokenResponse(account_id=subject.id)

    async def _register(self, subject: Subject, context: grpc.aio.ServicerContext) -> str:
        try:
            issued = await self._store.register(subject)
        except TokenExists:
            await context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{subject.description} already has a token; use "
                f"{ROTATE_RPC[subject.kind]} to replace it",
            )
        except CredentialStoreUnavailable:
            await _store_unavailable(context)
        log.info(
            "token issued", extra={"kind": subject.kind.value, f"{subject.kind}_id": subject.id}
        )
        return issued.token

    async def _rotate(self, subject: Subject, context: grpc.aio.ServicerContext) -> str:
        try:
            issued = await self._store.rotate(subject)
        except NoToken:
            await _no_token(subject, context)
        except CredentialStoreUnavailable:
            await _store_unavailable(context)
        log.info(
            "token rotated", extra={"kind": subject.kind.value, f"{subject.kind}_id": subject.id}
        )
        return issued.token

    async def _revoke(self, subject: Subject, context: grpc.aio.ServicerContext) -> None:
        try:
            await self._store.revoke(subject)
        except NoToken:
            await _no_token(subject, context)
        except CredentialStoreUnavailable:
            await _store_unavailable(context)
        log.info(
            "token revoked", extra={"kind": subject.kind.value, f"{subject.kind}_id": subject.id}
        )

    async def _require_catalog_account(
        self, account_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        """Billing answers NOT_FOUND (with what to do) for an account its catalog lacks."""
        try:
            await self._billing.call(
                "GetAccount", billing_pb2.GetAccountRequest(account_id=account_id)
            )
        except grpc.aio.AioRpcError as error:
            await abort_upstream_failure(context, "billing", error)

    async def _checked(
        self, kind: TokenKind, subject_id: str, context: grpc.aio.ServicerContext
    ) -> Subject:
        if not ID_PATTERN.fullmatch(subject_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{kind}_id: {subject_id[:64]!r}: use {ID_RULE}"
            )
        return Subject(kind, subject_id)


_REGISTER = {TokenKind.DEVICE: "RegisterDevice", TokenKind.ACCOUNT: "IssueAccountToken"}


async def _no_token(subject: Subject, context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.NOT_FOUND,
        f"{subject.description} has no token; use {_REGISTER[subject.kind]}",
    )


async def _store_unavailable(context: grpc.aio.ServicerContext) -> None:
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, "credential store (MongoDB) unreachable; retry shortly"
    )
