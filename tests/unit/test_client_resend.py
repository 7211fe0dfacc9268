"""How the scripts' loggers wait before resending: the server's hint first, else a backoff."""

from __future__ import annotations

import grpc
from grpc.aio import AioRpcError, Metadata

from common.errors import Reason, error_info_of, retry_info_of, rich_status
from scripts.client_options import RESEND_CODES, resend_delay_s


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
    assert grpc.StatusCode.INVALID_ARGUMENT not in RESEND_CODES
