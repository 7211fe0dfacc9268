"""Errors across services as typed details: a ``google.rpc.Status`` with an ``ErrorInfo``.

A service that knows *why* a call failed attaches a reason code (``grpc-status-details-bin``
trailer); the caller decides from the reason, never from the message, which stays free to
change wording for people.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.interceptors import add_trailing_metadata

DOMAIN = "energy.v1"


class Reason(StrEnum):
    """Why a call failed, as ``ErrorInfo.reason`` (UPPER_SNAKE_CASE, as google.rpc asks)."""

    BROKER_UNAVAILABLE = "BROKER_UNAVAILABLE"  # RabbitMQ unreachable or the connection lost
    BROKER_BLOCKED = "BROKER_BLOCKED"  # a memory or disk alarm blocks publishers
    QUEUE_FULL = "QUEUE_FULL"  # RabbitMQ nacked the messages (queue at its length limit)
    NO_QUEUE_BOUND = "NO_QUEUE_BOUND"  # returned unroutable: no queue for the routing key
    CONFIRM_TIMEOUT = "CONFIRM_TIMEOUT"  # no confirm in time; the readings may be stored
    # Too many readings wait for confirms already; nothing was published, resend after the
    # RetryInfo delay.
    INGESTION_BUSY = "INGESTION_BUSY"
    INVALID_READING = "INVALID_READING"  # a reading failed validation
    # An internal service could not be reached at all (metadata "service" names it).
    UPSTREAM_UNAVAILABLE = "UPSTREAM_UNAVAILABLE"
    # A service answered but a store it needs (MongoDB, Redis) failed; metadata "service"
    # names the service. Nothing changed; retry shortly.
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


def error_info_of(
    reason: Reason, metadata: Mapping[str, str] | None = None
) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=metadata)


def retry_info_of(delay_s: float) -> error_details_pb2.RetryInfo:
    """``RetryInfo`` asking the caller to wait ``delay_s`` (ms precision) before resending."""
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(max(1, round(delay_s * 1000)))
    return retry


def rich_status(
    code: grpc.StatusCode,
    message: str,
    info: error_details_pb2.ErrorInfo,
    retry: error_details_pb2.RetryInfo | None = None,
) -> grpc.Status:
    """A status whose ``grpc-status-details-bin`` trailer carries ``info`` (and ``retry``)."""
    packed = []
    for detail in (info,) if retry is None else (info, retry):
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return rpc_status.to_status(status)


async def abort_with_info(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    info: error_details_pb2.ErrorInfo,
    retry: error_details_pb2.RetryInfo | None = None,
) -> NoReturn:
    """``context.abort`` with ``info`` (and ``retry``) attached; the caller sees ``code`` and
    ``message``."""
    status = rich_status(code, message, info, retry)
    trailers = add_trailing_metadata(context, *status.trailing_metadata)
    await context.abort(status.code, status.details, trailers)
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def abort_with_reason(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: Reason,
    metadata: Mapping[str, str] | None = None,
    retry_after_s: float | None = None,
) -> NoReturn:
    """``context.abort`` with ``ErrorInfo(reason, domain=energy.v1, metadata)`` attached, and
    a ``RetryInfo`` of ``retry_after_s`` when given."""
    retry = retry_info_of(retry_after_s) if retry_after_s is not None else None
    await abort_with_info(context, code, message, error_info_of(reason, metadata), retry)


def _details(error: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a trailer that contradicts the call's status: not trusted
        return []
    return list(status.details) if status is not None else []


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ``ErrorInfo`` of our domain a failed call carries, or None (e.g. the channel
    failed before the service answered, or the service attached no detail)."""
    for detail in _details(error):
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    """The ``RetryInfo`` a failed call carries (the server's hint when to resend), or None."""
    for detail in _details(error):
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry
    return None


def retry_delay_s(error: grpc.aio.AioRpcError) -> float | None:
    """How long the server asked the caller to wait before resending, or None."""
    retry = retry_info(error)
    return retry.retry_delay.ToTimedelta().total_seconds() if retry is not None else None


def reason_of(error: grpc.aio.AioRpcError) -> Reason | None:
    """The failed call's reason code, if it carries one this module knows."""
    info = error_info(error)
    if info is None:
        return None
    try:
        return Reason(info.reason)
    except ValueError:  # a newer service's reason: treat as no reason, not as a crash
        return None
