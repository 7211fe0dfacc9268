"""Month-to-date billed amounts, asked of billing_service's read API (the bills themselves)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from decimal import Decimal

import grpc
from prometheus_client import Gauge

from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.metrics import ClientMetricsInterceptor
from common.tls import InternalClientTlsSettings, client_channel

log = logging.getLogger(__name__)

BILLED = Gauge(
    "energy_billed_amount",
    "Month-to-date total of the accounts' bills (standing charges and tax included), by currency.",
    ["currency"],
)


class BilledAmounts:
    """Polls GetAccountBill for every account of the catalog and sums totals by currency."""

    def __init__(
        self, address: str, timeout_s: float, tls: InternalClientTlsSettings | None = None
    ) -> None:
        self._channel = client_channel(address, tls, [ClientMetricsInterceptor()])
        self._stub = billing_pb2_grpc.BillingStub(self._channel)
        self._timeout_s = timeout_s

    async def refresh(self, account_ids: list[str]) -> None:
        totals: dict[str, Decimal] = {}
        for account_id in account_ids:
            try:
                bill = await self._stub.GetAccountBill(
                    billing_pb2.GetAccountBillRequest(account_id=account_id),
                    timeout=self._timeout_s,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    continue  # an account without devices has no bill
                raise
            totals[bill.currency] = totals.get(bill.currency, Decimal(0)) + Decimal(bill.total)
        for currency, total in totals.items():
            BILLED.labels(currency).set(float(total))

    async def refresh_forever(self, accounts: Callable[[], list[str]], interval_s: float) -> None:
        """Every interval: the accounts come from ``accounts()``; failures keep the last values."""
        while True:
            try:
                await self.refresh(accounts())
            except Exception:
                log.warning("could not refresh billed amounts; keeping the last", exc_info=True)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        await self._channel.close()
