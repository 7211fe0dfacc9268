"""Issued bills in MongoDB: stored once, numbered without gaps, never updated.

Two collections, single-document atomic writes only (no transactions: standalone MongoDB
and the local server have none), correct with any number of billing processes closing the
same period at once:

1. ``bill_books``: one document per account, ``{_id: account, last: n, periods: {p: n}}``.
   A number is reserved by an update conditional on ``last == n`` and on ``periods.<p>``
   being absent (set ``last = n + 1``, ``periods.<p> = n + 1``), retried on a conflict; the
   first of an account is an insert (a duplicate key is a conflict). A period that already
   has a number keeps it, so a close that crashed after reserving reuses its number.
2. ``issued_bills``: one document per account and period, ``_id = "<account>|<YYYY-MM>"``,
   inserted once and never updated; a duplicate key means another process issued it first,
   and its document is the bill. The bills' protos are stored as bytes, so a read returns
   exactly what was issued.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pymongo.errors import DuplicateKeyError

from billing_service.domain.ledger import TransientFailure
from common.mongo import Database, transient_as

# Conflicting reservations of one account's next number retried at most this often (each
# retry means another process took a number meanwhile: a burst of closes, not a fault).
MAX_RESERVE_ATTEMPTS = 50


class BillStoreConflict(RuntimeError):
    """A number could not be reserved: other processes kept taking numbers meanwhile."""


@dataclass(frozen=True)
class CarriedAdjustment:
    """An adjustment an issued device bill carried: of ``period``, its amount and energy."""

    period: str
    amount: Decimal
    energy_kwh: Decimal


@dataclass(frozen=True)
class IssuedDevice:
    """One device's part of an issued bill, and its ``Bill`` proto as issued."""

    device_id: str
    tariff_id: str
    total: Decimal  # charges + the adjustments carried
    charges: Decimal  # the period's own: subtotal + tax
    energy_kwh: Decimal
    adjustments: tuple[CarriedAdjustment, ...]
    bill_bytes: bytes = b""


@dataclass(frozen=True)
class UsedVersion:
    """A tariff version that priced an issued bill (checked when a catalog is loaded)."""

    tariff_id: str
    effective_from: str | None  # ISO date; None: the version from the beginning
    fingerprint: str


@dataclass(frozen=True)
class IssuedBill:
    """An account's bill for a closed period, as stored. ``response_bytes`` is the
    serialized ``GetAccountBillResponse``; both byte fields are empty when a query asked
    for the bookkeeping only."""

    account_id: str
    period: str  # YYYY-MM
    period_end_local_date: str  # ISO date: the period's last local day
    number: int
    bill_id: str
    issued_at: datetime
    currency: str
    total: Decimal
    devices: tuple[IssuedDevice, ...]
    versions: tuple[UsedVersion, ...]
    response_bytes: bytes = b""

    def device(self, device_id: str) -> IssuedDevice | None:
        return next((d for d in self.devices if d.device_id == device_id), None)


def document_id(account_id: str, period: str) -> str:
    return f"{account_id}|{period}"


# The bookkeeping of issued bills without the stored protos (reads for adjustments).
_NO_BYTES = {"response_bytes": 0, "devices.bill_bytes": 0}


class MongoBillStore:
    """``issued_bills`` and ``bill_books`` of one database."""

    def __init__(self, database: Database) -> None:
        self._bills = database["issued_bills"]
        self._books = database["bill_books"]

    async def reserve_number(self, account_id: str, period: str) -> int:
        """The account's number for ``period``: the one reserved before, else the next."""
        field = f"periods.{period}"
        with transient_as(TransientFailure):
            for _ in range(MAX_RESERVE_ATTEMPTS):
                book = await self._books.find_one({"_id": account_id})
                if book is None:
                    try:
                        await self._books.insert_one(
                            {"_id": account_id, "last": 1, "periods": {period: 1}}
                        )
                        return 1
                    except DuplicateKeyError:
                        continue  # another process numbered the account's first bill
                reserved = book.get("periods", {}).get(period)
                if reserved is not None:
                    return int(reserved)
                last = int(book["last"])
                result = await self._books.update_one(
                    {"_id": account_id, "last": last, field: {"$exists": False}},
                    {"$set": {"last": last + 1, field: last + 1}},
                )
                if result.matched_count == 1:
                    return last + 1
        raise BillStoreConflict(
            f"could not number the bill of {account_id!r} for {period} in "
            f"{MAX_RESERVE_ATTEMPTS} attempts; other processes kept numbering its bills"
        )

    async def insert(self, bill: IssuedBill) -> tuple[IssuedBill, bool]:
        """Store ``bill`` unless the period is issued already; return the stored bill and
        whether this call stored it."""
        with transient_as(TransientFailure):
            try:
                await self._bills.insert_one(_document(bill))
                return bill, True
            except DuplicateKeyError:
                pass
            stored = await self.get(bill.account_id, bill.period)
        if stored is None:  # pragma: no cover - a duplicate key means the document exists
            raise TransientFailure(f"issued bill {bill.bill_id} vanished; retry")
        return stored, False

    async def get(self, account_id: str, period: str, with_bytes: bool = True) -> IssuedBill | None:
        with transient_as(TransientFailure):
            document = await self._bills.find_one(
                {"_id": document_id(account_id, period)},
                projection=None if with_bytes else _NO_BYTES,
            )
        return None if document is None else _issued(document)

    async def _periods(self, account_id: str) -> list[str]:
        """The periods numbered for the account, oldest first (from its book, by ``_id``)."""
        book = await self._books.find_one({"_id": account_id}, projection={"periods": 1})
        return sorted((book or {}).get("periods", {}))

    async def _by_periods(
        self, account_id: str, periods: Sequence[str], with_bytes: bool
    ) -> dict[str, IssuedBill]:
        if not periods:
            return {}
        ids = [document_id(account_id, period) for period in periods]
        found = {}
        async for document in self._bills.find(
            {"_id": {"$in": ids}}, projection=None if with_bytes else _NO_BYTES
        ):
            bill = _issued(document)
            found[bill.period] = bill
        return found

    async def of_account(self, account_id: str) -> list[IssuedBill]:
        """The account's issued bills (bookkeeping only, no bytes), oldest first.

        Read by ``_id`` through the account's book (a period numbered but not yet stored,
        a close that crashed in between, is not issued and not listed).
        """
        periods, found = await self._numbered(account_id)
        return [found[period] for period in periods if period in found]

    async def numbered_unissued(self, account_id: str) -> list[str]:
        """Periods the account's book numbered but no bill was stored for (a close that
        stopped between the two), oldest first: their next close reuses the number."""
        periods, found = await self._numbered(account_id)
        return [period for period in periods if period not in found]

    async def _numbered(self, account_id: str) -> tuple[list[str], dict[str, IssuedBill]]:
        """The periods the account's book numbered, oldest first, and the bills stored for
        them (bookkeeping only, no bytes)."""
        with transient_as(TransientFailure):
            periods = await self._periods(account_id)
            return periods, await self._by_periods(account_id, periods, with_bytes=False)

    async def page(
        self, account_id: str, page_size: int, page_token: str
    ) -> tuple[list[IssuedBill], str]:
        """Issued bills of the account, newest first, ``page_size`` from ``page_token``."""
        before = _decode_token(page_token, account_id) if page_token else None
        with transient_as(TransientFailure):
            periods = [
                p for p in reversed(await self._periods(account_id)) if before is None or p < before
            ]
            # A numbered period not stored yet is skipped; read a little more than a page.
            wanted = periods[: page_size + 1]
            found = await self._by_periods(account_id, wanted, with_bytes=True)
            while len(found) <= page_size and len(wanted) < len(periods):
                more = periods[len(wanted) : len(wanted) + page_size]
                wanted += more
                found.update(await self._by_periods(account_id, more, with_bytes=True))
        bills = [found[period] for period in wanted if period in found]
        if len(bills) <= page_size:
            return bills, ""
        return bills[:page_size], _encode_token(account_id, bills[page_size - 1].period)

    async def all_versions(self) -> list[tuple[IssuedBill, UsedVersion]]:
        """Every tariff version every issued bill used (for the catalog check)."""
        with transient_as(TransientFailure):
            bills = [
                _issued(document) async for document in self._bills.find({}, projection=_NO_BYTES)
            ]
        return [(bill, version) for bill in bills for version in bill.versions]


class InvalidPageToken(ValueError):
    """A page token this store did not issue, or one of another account."""


def _encode_token(account_id: str, period: str) -> str:
    payload = json.dumps({"a": account_id, "p": period})
    return base64.urlsafe_b64encode(payload.encode()).decode()


def _decode_token(token: str, account_id: str) -> str:
    try:
        payload = json.loads(base64.urlsafe_b64decode(token.encode()))
        account, period = str(payload["a"]), str(payload["p"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidPageToken(
            "page_token is not one this service issued; start again without a page_token"
        ) from None
    if account != account_id:
        raise InvalidPageToken(
            "page_token belongs to another account_id; use the same one, or start again "
            "without a page_token"
        )
    return period


def _document(bill: IssuedBill) -> dict[str, Any]:
    return {
        "_id": document_id(bill.account_id, bill.period),
        "account_id": bill.account_id,
        "period": bill.period,
        "period_end_local_date": bill.period_end_local_date,
        "number": bill.number,
        "bill_id": bill.bill_id,
        "issued_at": bill.issued_at,
        "currency": bill.currency,
        "total": str(bill.total),
        "devices": [
            {
                "device_id": d.device_id,
                "tariff_id": d.tariff_id,
                "total": str(d.total),
                "charges": str(d.charges),
                "energy_kwh": str(d.energy_kwh),
                "adjustments": [
                    {"period": a.period, "amount": str(a.amount), "energy_kwh": str(a.energy_kwh)}
                    for a in d.adjustments
                ],
                "bill_bytes": d.bill_bytes,
            }
            for d in bill.devices
        ],
        "versions": [
            {
                "tariff_id": v.tariff_id,
                "effective_from": v.effective_from,
                "fingerprint": v.fingerprint,
            }
            for v in bill.versions
        ],
        "response_bytes": bill.response_bytes,
    }


def _issued(document: dict[str, Any]) -> IssuedBill:
    issued_at = document["issued_at"]
    if issued_at.tzinfo is None:  # mongomock hands back naive UTC datetimes
        issued_at = issued_at.replace(tzinfo=UTC)
    return IssuedBill(
        account_id=document["account_id"],
        period=document["period"],
        period_end_local_date=document["period_end_local_date"],
        number=int(document["number"]),
        bill_id=document["bill_id"],
        issued_at=issued_at,
        currency=document["currency"],
        total=Decimal(document["total"]),
        devices=tuple(_device(d) for d in document["devices"]),
        versions=tuple(
            UsedVersion(v["tariff_id"], v["effective_from"], v["fingerprint"])
            for v in document["versions"]
        ),
        response_bytes=bytes(document.get("response_bytes", b"")),
    )


def _device(entry: dict[str, Any]) -> IssuedDevice:
    return IssuedDevice(
        device_id=entry["device_id"],
        tariff_id=entry["tariff_id"],
        total=Decimal(entry["total"]),
        charges=Decimal(entry["charges"]),
        energy_kwh=Decimal(entry["energy_kwh"]),
        adjustments=tuple(
            CarriedAdjustment(a["period"], Decimal(a["amount"]), Decimal(a["energy_kwh"]))
            for a in entry["adjustments"]
        ),
        bill_bytes=bytes(entry.get("bill_bytes", b"")),
    )
