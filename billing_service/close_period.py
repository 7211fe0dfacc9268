"""Issue bills for a closed period: ``make close-period PERIOD=YYYY-MM [ACCOUNT=id]``.

``python -m billing_service.close_period 2026-10 [--account id]``, with billing's settings
(MONGODB_URL, MONGODB_DATABASE, ...). Closes the period for one account, or for every
account of the stored catalog, and prints each bill issued now or issued before, with its
number and total. Safe to run beside running billing processes, and twice: a period is
issued once. Exits 1 if a period cannot be closed (it has not ended) or no catalog is stored.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.mongo_bills import MongoBillStore
from billing_service.closing import (
    BillCloser,
    Closed,
    DeviceBiller,
    PeriodNotClosable,
    ledger_slot_energy,
)
from billing_service.domain.tariff import CatalogError
from billing_service.queries import CatalogHolder, NoCatalog
from billing_service.settings import BillingSettings
from common.settings import load_settings

app = typer.Typer(add_completion=False)


@app.command()
def close_period(
    period: Annotated[str, typer.Argument(help="the local month to close, YYYY-MM")],
    account: Annotated[str, typer.Option(help="only this account (default: every one)")] = "",
) -> None:
    """Issue the bills of PERIOD (a month that has ended) and print them."""
    settings = load_settings(BillingSettings)
    try:
        results = asyncio.run(_close(settings, period, account))
    except (PeriodNotClosable, NoCatalog, CatalogError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    for result in results:
        bill = result.bill
        state = "issued" if result.issued_now else "already issued"
        typer.echo(
            f"{state}: bill {bill.bill_id} number {bill.number} for account "
            f"{bill.account_id}, {bill.period}: total {bill.total} {bill.currency}"
        )


async def _close(settings: BillingSettings, period: str, account: str) -> list[Closed]:
    ledger = MongoLedger.connect(
        settings.mongodb_url, settings.mongodb_database, settings.mongodb_timeout_s
    )
    try:
        bills = MongoBillStore(ledger.database)
        catalog = CatalogHolder(MongoCatalog(ledger.database), bills)
        await catalog.refresh()
        biller = DeviceBiller(ledger_slot_energy(ledger), ledger.late_writes)
        closer = BillCloser(biller, bills, catalog.require)
        known = catalog.require()
        # Every account with devices (one without has nothing to bill), or the one asked for.
        accounts = (
            [account] if account else [a.id for a in known.accounts if known.devices_of(a.id)]
        )
        return [await closer.close_period(account_id, period) for account_id in accounts]
    finally:
        ledger.close()


if __name__ == "__main__":
    app()
