"""Server and client gRPC interceptors for the request id, and the wrapping they share.

A server interceptor here runs code *around* a call's handler, inside the call's own task,
so a contextvar it sets is seen by the handler and by every log line the handler writes
(grpc ``examples/python/interceptors/async``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc

from common import request_id
from common.request_id import REQUEST_ID_HEADER

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def wrap_unary_response(
    handler: grpc.RpcMethodHandler, around: Around
) -> grpc.RpcMethodHandler | None:
    """``handler`` with its behaviour run inside ``around(context)``; None when the RPC
    streams its responses (health Watch, reflection), which this does not wrap."""
    if handler.unary_unary:
        make, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif handler.stream_unary:
        make, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        return None

    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            return await behaviour(request_or_iterator, context)

    return make(
        wrapper,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Binds the call's ``x-request-id`` (or a new id) for the length of the call.

    With ``echo`` (the public gateway) the id goes back to the caller in the trailing
    metadata, so a caller that sent none can still quote it; internal services skip that.
    Trailers, not headers: they go out with the status at no cost, while initial metadata
    is a send of its own, about a fifth of the gateway's SendReading calls/s at c=64. Code
    that sets trailers later keeps it (``add_trailing_metadata``), and an abort without
    trailers of its own sends those already set.
    """

    def __init__(self, echo: bool = False) -> None:
        self._echo = echo

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        metadata = handler_call_details.invocation_metadata or ()
        the_id = request_id.accept(next((v for k, v in metadata if k == REQUEST_ID_HEADER), None))

        @asynccontextmanager
        async def bound(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            if self._echo:
                context.set_trailing_metadata(((REQUEST_ID_HEADER, the_id),))
            with request_id.bound(the_id):
                yield

        return wrap_unary_response(handler, bound) or handler


def add_trailing_metadata(
    context: grpc.aio.ServicerContext, *pairs: tuple[str, str | bytes]
) -> tuple[tuple[str, str | bytes], ...]:
    """Set ``pairs`` as trailers beside those already set (such as the echoed request id);
    return them all, for an ``abort`` that names its trailers."""
    trailers = (*(context.trailing_metadata() or ()), *pairs)
    context.set_trailing_metadata(trailers)
    return trailers


class _WithRequestId:
    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        the_id = request_id.current()
        if the_id is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (REQUEST_ID_HEADER, the_id))
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


# grpc.aio files each client interceptor under one kind only, hence one class per kind.
class RequestIdUnaryClientInterceptor(_WithRequestId, grpc.aio.UnaryUnaryClientInterceptor):
    """Passes the current request id on to the called service as ``x-request-id``."""

    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


def request_id_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The interceptors an internal client channel needs to carry the request id."""
    return [RequestIdUnaryClientInterceptor()]
