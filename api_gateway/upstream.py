"""An internal service's failure, answered to the gateway's caller.

Decided from the typed detail (``common.errors``), never from the message: a status that
carries our ``ErrorInfo`` was answered by the service itself (its code, message, reason and
``RetryInfo``, the hint when to resend, pass through); an UNAVAILABLE without one means the
service could not be reached at all.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from common.errors import Reason, abort_with_info, error_info, error_info_of, retry_info

log = logging.getLogger(__name__)


async def abort_upstream_failure(
    context: grpc.aio.ServicerContext,
    service: str,
    error: grpc.aio.AioRpcError,
    note: str = "",
    log_failure: bool = False,
) -> NoReturn:
    """Abort with ``error``'s code and message (plus ``note``), its reason and its retry
    hint, if any."""
    code = error.code()
    details = error.details() or code.name
    info = error_info(error)
    if info is None and code == grpc.StatusCode.UNAVAILABLE:
        details = f"{service} service unreachable ({details}); retry shortly"
        info = error_info_of(Reason.UPSTREAM_UNAVAILABLE, {"service": service})
    details += note
    if log_failure:
        log.warning(
            "forward to %s failed",
            service,
            extra={
                "code": code.name,
                "reason": info.reason if info is not None else "",
                "error": details,
            },
        )
    if info is None:  # nothing typed to pass on (e.g. billing answers with a plain status)
        await context.abort(code, details)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises
    await abort_with_info(context, code, details, info, retry_info(error))
