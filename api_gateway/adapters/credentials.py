"""Device credentials in MongoDB (collection ``device_credentials``), cached briefly.

One document per device: ``_id`` = device_id, the current ``key_id`` (unique index), the
SHA-256 of the secret and ``revoked_at``. Rotation replaces the key in place, so a device
has one live token at most. Lookups are cached for ``cache_ttl_s`` in each gateway process:
a revocation made through another replica takes effect within that time, and at once on the
replica that made it.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from datetime import UTC, datetime

from cachetools import TTLCache
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from api_gateway.auth import Credential, IssuedToken, issue_token
from common.mongo import Collection, connect, transient_as

COLLECTION = "device_credentials"


class CredentialStoreUnavailable(Exception):
    """MongoDB did not answer; the caller should retry (UNAVAILABLE)."""


class DeviceExists(Exception):
    """The device already has a live token."""


class UnknownDevice(Exception):
    """No credential was ever issued for the device."""


class MongoCredentialStore:
    def __init__(self, collection: Collection, cache_ttl_s: float) -> None:
        self._collection = collection
        self._cache: TTLCache[str, Credential | None] = TTLCache(maxsize=100_000, ttl=cache_ttl_s)
        self._indexed = asyncio.Lock()
        self._has_index = False

    @classmethod
    def connect(
        cls, url: str, database: str, timeout_s: float, cache_ttl_s: float
    ) -> MongoCredentialStore:
        return cls(connect(url, database, timeout_s)[COLLECTION], cache_ttl_s)

    def close(self) -> None:
        self._collection.database.client.close()

    async def find(self, key_id: str) -> Credential | None:
        if key_id in self._cache:
            return self._cache[key_id]
        with _unavailable():
            document = await self._collection.find_one({"key_id": key_id})
        credential = _credential(document) if document else None
        self._cache[key_id] = credential
        return credential

    async def register(self, device_id: str) -> IssuedToken:
        issued = issue_token(device_id)
        try:
            with _unavailable():
                await self._ensure_index()
                await self._collection.insert_one({"_id": device_id, **_fields(issued.credential)})
        except DuplicateKeyError:
            raise DeviceExists(device_id) from None
        return issued

    async def rotate(self, device_id: str) -> IssuedToken:
        issued = issue_token(device_id)
        with _unavailable():
            await self._ensure_index()
            previous = await self._collection.find_one_and_update(
                {"_id": device_id},
                {"$set": _fields(issued.credential)},
                return_document=ReturnDocument.BEFORE,
            )
        if previous is None:
            raise UnknownDevice(device_id)
        self._cache.pop(previous["key_id"], None)
        return issued

    async def revoke(self, device_id: str) -> None:
        with _unavailable():
            previous = await self._collection.find_one_and_update(
                {"_id": device_id}, {"$set": {"revoked_at": datetime.now(UTC)}}
            )
        if previous is None:
            raise UnknownDevice(device_id)
        self._cache.pop(previous["key_id"], None)

    async def _ensure_index(self) -> None:
        async with self._indexed:
            if not self._has_index:
                await self._collection.create_index([("key_id", ASCENDING)], unique=True)
                self._has_index = True


def _unavailable() -> AbstractContextManager[None]:
    return transient_as(CredentialStoreUnavailable, "credential store (MongoDB)")


def _fields(credential: Credential) -> dict[str, object]:
    return {
        "device_id": credential.device_id,
        "key_id": credential.key_id,
        "secret_sha256": credential.secret_sha256,
        "issued_at": datetime.now(UTC),
        "revoked_at": None,
    }


def _credential(document: dict) -> Credential:
    return Credential(
        device_id=document["device_id"],
        key_id=document["key_id"],
        secret_sha256=document["secret_sha256"],
        revoked_at=document.get("revoked_at"),
    )
