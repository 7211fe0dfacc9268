"""A client channel to the public gateway that sends a bearer token with every call.

The scripts (simulator, CSV import, reconcile, benchmarks) and the tests use it, so a
token is added in one place: ``authorization: Bearer <token>``, the header the gateway
expects. Without a token the channel is a plain one (a gateway with auth switched off).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

TOKEN_ENV = "GATEWAY_TOKEN"


class _WithToken:
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]


# grpc.aio files each interceptor under one kind only, hence one class per kind.
class _UnaryUnary(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


class _StreamUnary(_WithToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request_iterator)


class _UnaryStream(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._details(details), request)


def gateway_channel(
    target: str,
    token: str | None,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to ``target`` that authenticates every call with ``token`` (if any)."""
    kinds = (_UnaryUnary, _StreamUnary, _UnaryStream)
    interceptors = [kind(token) for kind in kinds] if token else []
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options, interceptors=interceptors)
