"""The read RPCs the gateway forwards to billing_service, declared in one table.

Each row says which Gateway method, which Billing call answers it, and who may ask;
``ReadForwarder`` turns a row into the handler. The caller is already authenticated
(``api_gateway.identity``); the rule only decides whether it may read this data. Every
read then takes a token from its caller's read bucket (``Guard.admit_read``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from api_gateway.adapters.billing import BillingClient
from api_gateway.auth import Principal
from api_gateway.guard import Guard
from api_gateway.identity import caller
from api_gateway.upstream import abort_upstream_failure

# Awaits nothing when the caller may read, else aborts the call with the refusal.
Rule = Callable[[Guard, Principal, Any, grpc.aio.ServicerContext], Awaitable[None]]
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


async def device_data(
    guard: Guard, principal: Principal, request: Any, context: grpc.aio.ServicerContext
) -> None:
    """A device's data (``request.device_id``): its own token, its account's token, or the
    admin token (anyone, with auth switched off)."""
    await guard.require_reader(principal, request.device_id, context)


async def account_data(
    guard: Guard, principal: Principal, request: Any, context: grpc.aio.ServicerContext
) -> None:
    """An account's bills (``request.account_id``): its account token or the admin token
    (anyone, with auth switched off)."""
    await guard.require_account(principal, request.account_id, context)


@dataclass(frozen=True)
class Read:
    method: str  # of energy.v1.Gateway
    upstream: str  # the energy.v1.Billing RPC that answers it, same request and response
    rule: Rule


READS: tuple[Read, ...] = (
    Read("GetLatestReading", "GetLatestReading", device_data),
    Read("GetDeviceBill", "GetDeviceBill", device_data),
    Read("GetAccountBill", "GetAccountBill", account_data),
    Read("ListBills", "ListBills", account_data),
    Read("GetUsage", "GetUsage", device_data),
    Read("ListReadings", "ListReadings", device_data),
)


class ReadForwarder:
    """Builds the handler of each ``Read``: rule, then the caller's read bucket, then
    billing, its failures passed on."""

    def __init__(self, billing: BillingClient, guard: Guard) -> None:
        self._billing = billing
        self._guard = guard

    def handler(self, read: Read) -> Handler:
        async def forward(request: Any, context: grpc.aio.ServicerContext) -> Message:
            principal = caller()
            await read.rule(self._guard, principal, request, context)
            # After the rule, so a refused caller spends no token.
            await self._guard.admit_read(principal, context)
            try:
                response: Message = await self._billing.call(read.upstream, request)
            except grpc.aio.AioRpcError as error:
                await abort_upstream_failure(context, "billing", error)
            return response

        forward.__name__ = forward.__qualname__ = read.method
        return forward
