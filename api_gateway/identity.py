"""Who is calling, decided once per call by an interceptor and read from a contextvar.

``AuthInterceptor`` authenticates every call of a guarded service before its handler runs
(UNAUTHENTICATED / PERMISSION_DENIED answers come from ``Guard``, unchanged) and binds the
caller's ``Principal``; handlers ask ``caller()`` instead of checking tokens themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar

import grpc

from api_gateway.auth import ADMIN, Principal
from api_gateway.guard import Guard
from common.interceptors import Continuation, wrap_unary_response

_caller: ContextVar[Principal | None] = ContextVar("caller", default=None)

# How a call of a guarded service proves who it is.
Check = Callable[[Guard, grpc.aio.ServicerContext], Awaitable[Principal]]


async def _any_token(guard: Guard, context: grpc.aio.ServicerContext) -> Principal:
    return await guard.caller(context)


async def _admin_token(guard: Guard, context: grpc.aio.ServicerContext) -> Principal:
    await guard.require_admin(context)  # even with GATEWAY_AUTH_ENABLED=false
    return ADMIN


ANY_TOKEN: Check = _any_token
ADMIN_TOKEN: Check = _admin_token


def caller() -> Principal:
    """The principal of the call being handled; only inside a guarded service's handler."""
    principal = _caller.get()
    if principal is None:  # a handler of a service the interceptor does not guard
        raise RuntimeError("no caller bound: is the service listed in AuthInterceptor?")
    return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Runs ``checks[service]`` before each call of that service; other services (health,
    reflection) pass untouched."""

    def __init__(self, guard: Guard, checks: Mapping[str, Check]) -> None:
        self._guard = guard
        self._checks = dict(checks)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.strip("/").rpartition("/")[0]
        check = self._checks.get(service)
        if handler is None or check is None:
            return handler

        @asynccontextmanager
        async def authenticated(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            token = _caller.set(await check(self._guard, context))
            try:
                yield
            finally:
                _caller.reset(token)

        wrapped = wrap_unary_response(handler, authenticated)
        if wrapped is None:  # fail closed: never serve a guarded method unauthenticated
            raise TypeError(f"{handler_call_details.method}: streaming responses are not guarded")
        return wrapped
