"""Bills as ``energy.v1`` messages: what the read API answers and what closing stores.

One place, so an issued bill is stored in exactly the form a read of an open period takes.
"""

from __future__ import annotations

from datetime import datetime

from billing_service.domain.bill import AccountBill, Bill
from common.energy.v1 import billing_pb2

ESTIMATE = billing_pb2.BILL_STATUS_ESTIMATE
ISSUED = billing_pb2.BILL_STATUS_ISSUED


def bill_message(device_id: str, bill: Bill) -> billing_pb2.Bill:
    """A device's bill (an estimate; ``issue`` marks it issued)."""
    message = billing_pb2.Bill(
        device_id=device_id,
        tariff_id=bill.tariff_id,
        currency=bill.currency,
        period=bill.period.label,
        energy_kwh=str(bill.energy_kwh),
        subtotal=str(bill.subtotal),
        tax=str(bill.tax),
        total=str(bill.total),
        status=ESTIMATE,
    )
    message.period_start.FromDatetime(bill.period.start)
    message.period_end.FromDatetime(bill.period.end)
    message.as_of.FromDatetime(bill.as_of)
    for line in bill.lines:
        message.lines.add(
            description=line.description,
            quantity=str(line.quantity),
            unit=line.unit,
            unit_price=str(line.unit_price),
            amount=str(line.amount),
        )
    for adjustment in bill.adjustments:
        message.adjustments.add(
            period=adjustment.period_label,
            issued_bill_id=adjustment.issued_bill_id,
            energy_kwh=str(adjustment.energy_kwh),
            amount=str(adjustment.amount),
        )
    return message


def account_message(account: AccountBill) -> billing_pb2.GetAccountBillResponse:
    """An account's bill (an estimate; ``issue`` marks it issued)."""
    return billing_pb2.GetAccountBillResponse(
        account_id=account.account_id,
        currency=account.currency,
        period=account.period.label,
        bills=[bill_message(device_id, bill) for device_id, bill in account.bills.items()],
        total=str(account.total),
        status=ESTIMATE,
    )


def issue(
    message: billing_pb2.GetAccountBillResponse, bill_id: str, number: int, issued_at: datetime
) -> None:
    """Mark the account's bill and each device bill in it issued, in place."""
    for target in (message, *message.bills):
        target.status = ISSUED
        target.bill_id = bill_id
        target.number = number
        target.issued_at.FromDatetime(issued_at)
