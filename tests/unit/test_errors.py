"""Typed error details: packed by a service, unpacked and decided on by its caller."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from api_gateway.upstream import abort_upstream_failure
from common.errors import (
    DOMAIN,
    Reason,
    error_info,
    error_info_of,
    reason_of,
    retry_delay_s,
    retry_info_of,
    rich_status,
)
from ingestion_service.adapters.rabbit import (
    BrokerBlocked,
    BrokerRefused,
    BrokerUnavailable,
    ConfirmTimeout,
    IngestionBusy,
    NoQueueBound,
)
from ingestion_service.api import BROKER_ERRORS

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def failed(code: grpc.StatusCode, message: str, trailers: tuple[Any, ...] = ()) -> AioRpcError:
    """A call as the client sees it when the server answered ``code`` with ``trailers``."""
    return AioRpcError(code, Metadata(), Metadata(*trailers), message)


def answered(
    code: grpc.StatusCode, message: str, reason: Reason, retry_after_s: float | None = None
) -> AioRpcError:
    retry = retry_info_of(retry_after_s) if retry_after_s is not None else None
    status = rich_status(code, message, error_info_of(reason, {"k": "v"}), retry)
    return failed(status.code, status.details, status.trailing_metadata)


class Aborted(Exception):
    pass


class Context:
    """Records what a handler aborted with; trailers set before are kept, as grpc.aio does."""

    def __init__(self) -> None:
        self.trailers: tuple[Any, ...] = ()

    def trailing_metadata(self) -> tuple[Any, ...]:
        return self.trailers

    def set_trailing_metadata(self, trailers: Any) -> None:
        self.trailers = tuple(trailers)

    async def abort(self, code: grpc.StatusCode, details: str, trailers: Any = ()) -> None:
        self.code, self.details = code, details
        self.trailers = tuple(trailers) or self.trailers
        raise Aborted


def test_a_reason_survives_the_round_trip() -> None:
    error = answered(UNAVAILABLE, "RabbitMQ is not reachable", Reason.BROKER_BLOCKED)
    assert reason_of(error) == Reason.BROKER_BLOCKED
    info = error_info(error)
    assert info is not None and info.domain == DOMAIN and dict(info.metadata) == {"k": "v"}


def test_no_trusted_detail_is_no_reason() -> None:
    assert reason_of(failed(UNAVAILABLE, "failed to connect to all addresses")) is None
    status = rich_status(UNAVAILABLE, "said one thing", error_info_of(Reason.QUEUE_FULL))
    contradicting = failed(UNAVAILABLE, "answered another", status.trailing_metadata)
    assert reason_of(contradicting) is None
    foreign = error_info_of(Reason.QUEUE_FULL)
    foreign.domain = "example.com"
    other = rich_status(UNAVAILABLE, "m", foreign)
    assert reason_of(failed(UNAVAILABLE, "m", other.trailing_metadata)) is None


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (BrokerBlocked("b"), UNAVAILABLE, Reason.BROKER_BLOCKED),
        (BrokerUnavailable("u"), UNAVAILABLE, Reason.BROKER_UNAVAILABLE),
        (ConfirmTimeout("t"), grpc.StatusCode.DEADLINE_EXCEEDED, Reason.CONFIRM_TIMEOUT),
        (NoQueueBound("n"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.NO_QUEUE_BOUND),
        (BrokerRefused("r"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.QUEUE_FULL),
        (IngestionBusy("i", 0.5), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.INGESTION_BUSY),
    ],
)
def test_ingestion_maps_each_broker_failure_to_its_status_and_reason(
    error: Exception, code: grpc.StatusCode, reason: Reason
) -> None:
    assert next((c, r) for kind, c, r in BROKER_ERRORS if isinstance(error, kind)) == (
        code,
        reason,
    )


async def test_the_gateway_passes_a_services_own_answer_on_with_its_reason() -> None:
    context = Context()
    error = answered(
        UNAVAILABLE, "RabbitMQ is not reachable; retry shortly", Reason.BROKER_UNAVAILABLE
    )
    with pytest.raises(Aborted):
        await abort_upstream_failure(context, "ingestion", error, ". note")  # type: ignore[arg-type]
    assert context.code == UNAVAILABLE
    assert context.details == "RabbitMQ is not reachable; retry shortly. note"
    reached = failed(context.code, context.details, context.trailers)
    assert reason_of(reached) == Reason.BROKER_UNAVAILABLE


def test_a_retry_hint_survives_the_round_trip_beside_the_reason() -> None:
    busy = answered(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", Reason.INGESTION_BUSY, 0.25)
    assert reason_of(busy) == Reason.INGESTION_BUSY and retry_delay_s(busy) == 0.25
    no_hint = answered(UNAVAILABLE, "down", Reason.BROKER_UNAVAILABLE)
    assert retry_delay_s(no_hint) is None
    assert retry_delay_s(failed(UNAVAILABLE, "no route")) is None


async def test_the_gateway_passes_a_busy_refusal_on_with_its_retry_hint() -> None:
    context = Context()
    error = answered(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", Reason.INGESTION_BUSY, 1.5)
    with pytest.raises(Aborted):
        await abort_upstream_failure(context, "ingestion", error, ". 500 accepted")  # type: ignore[arg-type]
    reached = failed(context.code, context.details, context.trailers)
    assert (reached.code(), reached.details()) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "busy. 500 accepted",
    )
    assert reason_of(reached) == Reason.INGESTION_BUSY and retry_delay_s(reached) == 1.5


async def test_the_gateway_words_an_unreachable_service_and_names_it() -> None:
    context = Context()
    with pytest.raises(Aborted):
        await abort_upstream_failure(context, "billing", failed(UNAVAILABLE, "no route"))  # type: ignore[arg-type]
    assert context.details == "billing service unreachable (no route); retry shortly"
    info = error_info(failed(context.code, context.details, context.trailers))
    assert info is not None and info.reason == Reason.UPSTREAM_UNAVAILABLE
    assert dict(info.metadata) == {"service": "billing"}


async def test_a_plain_status_without_detail_passes_on_unchanged() -> None:
    context = Context()
    error = failed(grpc.StatusCode.NOT_FOUND, "no bill for meter-1 in 2026-01")
    with pytest.raises(Aborted):
        await abort_upstream_failure(context, "billing", error)  # type: ignore[arg-type]
    assert (context.code, context.details, context.trailers) == (
        grpc.StatusCode.NOT_FOUND,
        "no bill for meter-1 in 2026-01",
        (),
    )
