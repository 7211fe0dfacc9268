"""Load tariffs, accounts and devices from a YAML file into MongoDB: ``make seed``.

The file is validated first; on any error nothing is written and the message names the
file, line and key. So is a catalog that would change the bill of a closed (issued)
period: a version that priced one edited or removed, or a new version dated inside one
(``closed_period_problems``, fed from the versions recorded in ``issued_bills``).
billing_service picks the new catalog up within BILLING_CATALOG_REFRESH_S.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from billing_service.adapters.catalog_file import load_catalog, locate_problems
from billing_service.adapters.mongo import MongoCatalog, MongoLedger
from billing_service.adapters.mongo_bills import MongoBillStore
from billing_service.closing import issued_version_uses
from billing_service.domain.tariff import Catalog, CatalogError, closed_period_problems
from billing_service.settings import BillingSettings
from common.settings import load_settings

app = typer.Typer(add_completion=False)


@app.command()
def seed(
    path: Annotated[Path, typer.Argument(help="YAML file of tariffs, accounts and devices")],
    if_empty: Annotated[bool, typer.Option(help="load only when no catalog is stored yet")] = False,
) -> None:
    """Validate PATH and store it as billing's tariff catalog (MONGODB_URL, MONGODB_DATABASE)."""
    try:
        catalog = load_catalog(path)
    except CatalogError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    settings = load_settings(BillingSettings)
    try:
        stored = asyncio.run(_store(settings, catalog, path.read_text(), str(path), if_empty))
    except CatalogError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if stored:
        typer.echo(
            f"loaded {path}: {len(catalog.tariffs)} tariffs, {len(catalog.accounts)} accounts, "
            f"{len(catalog.devices)} devices into {settings.mongodb_database}"
        )
    else:
        typer.echo(f"a catalog is already stored in {settings.mongodb_database}; left it as is")


async def _store(
    settings: BillingSettings, catalog: Catalog, text: str, source: str, if_empty: bool
) -> bool:
    """Save the catalog, unless ``if_empty`` and one is stored; CatalogError (nothing
    written) if it would change a closed period."""
    ledger = MongoLedger.connect(
        settings.mongodb_url, settings.mongodb_database, settings.mongodb_timeout_s
    )
    try:
        store = MongoCatalog(ledger.database)
        if if_empty and await store.load() is not None:
            return False
        issued = await issued_version_uses(MongoBillStore(ledger.database))
        problems = closed_period_problems(catalog, issued)
        if problems:
            raise CatalogError("\n".join(locate_problems(text, source, problems)))
        await store.save(text, source)
        return True
    finally:
        ledger.close()


if __name__ == "__main__":
    app()
