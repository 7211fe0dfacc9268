"""Who may call, for which device or account, and how fast: auth and rate limits as gRPC
statuses."""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Sequence
from typing import NoReturn

import grpc
from prometheus_client import Counter

from api_gateway.adapters.billing import DeviceAccounts
from api_gateway.adapters.credentials import CredentialStoreUnavailable
from api_gateway.auth import ANYONE, Authenticator, AuthError, Principal, bearer_token
from api_gateway.auth import require_device as _require_device
from api_gateway.auth import require_sender as _require_sender
from api_gateway.ratelimit import RateLimits, RedisRateLimiter
from api_gateway.upstream import abort_upstream_failure
from common.energy.v1 import reading_pb2
from common.interceptors import add_trailing_metadata

AUTH_FAILURES = Counter(
    "gateway_auth_failures_total",
    "Calls refused by authentication or authorization, by status code and by the kind of "
    "token refused (device, account, admin; unknown when none or an invalid one).",
    ["code", "token"],
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
        accounts: DeviceAccounts | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._auth_enabled = auth_enabled
        self._limiter = limiter
        self._limits = limits
        self._accounts = accounts  # None: account tokens read no device

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

    async def require_sender(self, principal: Principal, context: grpc.aio.ServicerContext) -> None:
        """Account tokens are read-only: refused before anything of the call is read."""
        try:
            _require_sender(principal)
        except AuthError as error:
            await _refuse(context, error)

    async def require_reader(
        self, principal: Principal, device_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        """A device token reads its own device; an account token the devices billing's
        catalog bills to its account; the admin token any."""
        if principal.account_id is None:
            await self.require_device(principal, device_id, context)
            return
        account_id = ""
        if self._accounts is not None:
            try:
                account_id = await self._accounts.account_of(device_id)
            except grpc.aio.AioRpcError as error:  # billing's answer, e.g. UNAVAILABLE
                await abort_upstream_failure(context, "billing", error)
        if account_id != principal.account_id:
            await _refuse(
                context,
                AuthError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.description} may read only account {principal.account_id!r} "
                    "(its bill, its issued bills) and the devices billed to it; device "
                    f"{device_id!r} is not one of them",
                    token=principal.kind,
                ),
            )

    async def require_account(
        self, principal: Principal, account_id: str, context: grpc.aio.ServicerContext
    ) -> None:
        """An account's bills: its own account token, or the admin token."""
        if principal.admin or principal.unchecked or principal.account_id == account_id:
            return
        if principal.account_id is not None:
            message = (
                f"{principal.description} may read only account {principal.account_id!r} "
                f"(its bill, its issued bills) and the devices billed to it, not account "
                f"{account_id!r}"
            )
        else:
            message = (
                f"account bills need the account's own token (DeviceAdmin/IssueAccountToken) "
                f"or the admin token; {principal.description} may read only its device"
            )
        await _refuse(
            context,
            AuthError(grpc.StatusCode.PERMISSION_DENIED, message, token=principal.kind),
        )

    async def admit(
        self,
        principal: Principal,
        readings: Sequence[reading_pb2.Reading],
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
            if not math.isinf(decision.retry_after_s):
                await _exhausted(context, limit, decision.retry_after_s, note)
            advice = f"a batch of {count} can never fit: send fewer readings per stream batch"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"rate limit: {limit}; {advice}{note}"
            )

    async def admit_read(self, principal: Principal, context: grpc.aio.ServicerContext) -> None:
        """Take one token from the read bucket of the caller's device or account token, or
        answer RESOURCE_EXHAUSTED with the wait. The admin token (bulk tools such as
        reconcile) and callers with auth switched off are not limited."""
        if self._limiter is None or principal.admin or principal.unchecked:
            return
        caller_id = principal.device_id if principal.account_id is None else principal.account_id
        if caller_id is None:
            return
        decision = await self._limiter.acquire_read(principal.kind, caller_id)  # device, account
        if decision.allowed:
            return
        if decision.scope == "global_reads":
            limit = (
                f"the gateway answers {self._limits.global_read_rate_per_s:g} reads/s from all "
                f"device and account tokens together (burst {self._limits.global_read_burst})"
            )
        else:
            limit = (
                f"{principal.description} may make {self._limits.read_rate_per_s:g} reads/s "
                f"(burst {self._limits.read_burst})"
            )
        await _exhausted(context, limit, decision.retry_after_s)


async def _exhausted(
    context: grpc.aio.ServicerContext, limit: str, retry_after_s: float, note: str = ""
) -> NoReturn:
    """RESOURCE_EXHAUSTED with the wait in the message and the retry-pushback trailer."""
    wait_ms = max(1, math.ceil(retry_after_s * 1000))
    add_trailing_metadata(context, (RETRY_PUSHBACK_KEY, str(wait_ms)))
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"rate limit: {limit}; retry in {retry_after_s:.3f} s{note}",
    )
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


async def _refuse(context: grpc.aio.ServicerContext, error: AuthError, note: str = "") -> NoReturn:
    AUTH_FAILURES.labels(error.code.name, error.token).inc()
    await context.abort(error.code, f"{error}{note}")
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises
