"""What the scripts' loggers resend, and how long they wait first: the server's hint, else
a backoff."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc.aio import AioRpcError, Metadata

from common.errors import Reason, error_info_of, retry_info_of, rich_status
from scripts.client_options import RESEND_CODES, resend_delay_s, should_resend


def busy(retry_after_s: float) -> AioRpcError:
    status = rich_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ingestion is busy",
        error_info_of(Reason.INGESTION_BUSY),
        retry_info_of(retry_after_s),
    )
    return AioRpcError(status.code, Metadata(), Metadata(*status.trailing_metadata), status.details)


def test_a_hinted_refusal_waits_the_hint_spread_up_to_twice_as_long() -> None:
    waits = [resend_delay_s(busy(0.4), backoff_s=9.0) for _ in range(200)]
    assert all(0.4 <= wait <= 0.8 for wait in waits)
    assert max(waits) - min(waits) > 0.2, "spread, so refused loggers do not return together"


def test_without_a_hint_the_callers_own_backoff_applies() -> None:
    plain = AioRpcError(grpc.StatusCode.UNAVAILABLE, Metadata(), Metadata(), "down")
    assert resend_delay_s(plain, backoff_s=1.25) == 1.25


def test_loggers_resend_what_the_platform_could_not_take_now_only() -> None:
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in RESEND_CODES
    assert should_resend(busy(0.1))
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL):
        assert not should_resend(AioRpcError(code, Metadata(), Metadata(), "no"))


async def _refuse_after_500(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> bytes:
    count = 0
    async for _ in requests:
        count += 1
        if count == 500:  # as the gateway refuses a stream's first batch of 500
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
    return b""


async def test_a_refusal_the_python_client_reports_as_its_own_failed_write_is_resent() -> None:
    """grpc/grpc#36066: a stream answered before the client finished writing it sometimes
    ends in INTERNAL from the client's failed write instead of the server's status."""
    server = grpc.aio.server()
    method = grpc.stream_unary_rpc_method_handler(_refuse_after_500)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"M": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    errors: list[AioRpcError] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary("/t.T/M")

            async def send() -> None:
                try:
                    await call(iter([b"x" * 100] * 1000), timeout=30)
                except AioRpcError as error:
                    errors.append(error)

            for _ in range(10):
                await asyncio.gather(*(send() for _ in range(10)))
    finally:
        await server.stop(0)
    assert len(errors) == 100
    assert all(should_resend(error) for error in errors), {e.code() for e in errors}
