"""Who may call, for which device, and how fast: auth and rate limits as gRPC statuses."""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Sequence
from typing import NoReturn

import grpc
from prometheus_client import Counter

from api_gateway.adapters.credentials import CredentialStoreUnavailable
from api_gateway.auth import ANYONE, Authenticator, AuthError, Principal, bearer_token
from api_gateway.auth import require_device as _require_device
from api_gateway.ratelimit import RateLimits, RedisRateLimiter
from common.models import Reading

AUTH_FAILURES = Counter(
    "gateway_auth_failures_total", "Calls refused by authentication or authorization.", ["code"]
)
# gRPC's own retry machinery reads this trailer as the delay before the next attempt.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class Guard:
    def __init__(
        self,
        authenticator: Authenticator,
        auth_enabled: bool,
        limiter: RedisRateLimiter | None,
        limits: RateLimits,
    ) -> None:
        self._authenticator = authenticator
        self._auth_enabled = auth_enabled
        self._limiter = limiter
        self._limits = limits

    async def caller(self, context: grpc.aio.ServicerContext) -> Principal:
        """The principal of the call's bearer token (anyone when auth is switched off)."""
        if not self._auth_enabled:
            return ANYONE
        try:
            token = bearer_token(context.invocation_metadata())
            return await self._authenticator.principal(token)
        except AuthError as error:
            await _refuse(context, error)
        except CredentialStoreUnavailable:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "cannot check the token now (credential store unreachable); retry shortly",
            )

    async def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self._authenticator.require_admin(bearer_token(context.invocation_metadata()))
        except AuthError as error:
            await _refuse(context, error)

    async def require_device(
        self,
        principal: Principal,
        device_id: str,
        context: grpc.aio.ServicerContext,
        note: str = "",
    ) -> None:
        try:
            _require_device(principal, device_id)
        except AuthError as error:
            await _refuse(context, error, note)

    async def admit(
        self,
        principal: Principal,
        readings: Sequence[Reading],
        context: grpc.aio.ServicerContext,
        note: str = "",
    ) -> None:
        """Take one token per reading, or answer RESOURCE_EXHAUSTED with the wait."""
        if self._limiter is None or not readings:
            return
        if principal.admin:  # bulk import and backfill: only the global bucket applies
            per_device: dict[str | None, int] = {None: len(readings)}
        else:
            per_device = dict(Tally(reading.device_id for reading in readings))
        for device_id, count in per_device.items():
            decision = await self._limiter.acquire(device_id, count)
            if decision.allowed:
                continue
            if decision.scope == "device":
                limit = (
                    f"device {device_id!r} may send {self._limits.device_rate_per_s:g} readings/s "
                    f"(burst {self._limits.device_burst})"
                )
            else:
                limit = (
                    f"the gateway takes {self._limits.global_rate_per_s:g} readings/s in all "
                    f"(burst {self._limits.global_burst})"
                )
            if math.isinf(decision.retry_after_s):
                advice = f"a batch of {count} can never fit: send fewer readings per stream batch"
            else:
                wait_ms = max(1, math.ceil(decision.retry_after_s * 1000))
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(wait_ms)),))
                advice = f"retry in {decision.retry_after_s:.3f} s"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit: {limit}; {advice}{note}"
            )


async def _refuse(context: grpc.aio.ServicerContext, error: AuthError, note: str = "") -> NoReturn:
    AUTH_FAILURES.labels(error.code.name).inc()
    await context.abort(error.code, f"{error}{note}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises
