"""Credentials in MongoDB (collection ``device_credentials``), cached briefly.

One document per device or account token: its ``kind`` (``device``, or ``account``; a
document without one is a device's, as written before accounts had tokens), the id it
speaks for (``device_id`` or ``account_id``), the current ``key_id`` (unique index), the
SHA-256 of the secret and ``revoked_at``. ``_id`` is the device id, or ``account/<id>``
for an account (``/`` is in no id, so the two never meet). Rotation replaces the key in
place, so a device or account has one live token at most. Lookups are cached for
``cache_ttl_s`` in each gateway process: a revocation made through another replica takes
effect within that time, and at once on the replica that made it.
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractContextManager
from datetime import UTC, datetime

from cachetools import TTLCache
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from api_gateway.auth import Credential, IssuedToken, Subject, TokenKind, issue_token
from common.mongo import Collection, connect, transient_as

COLLECTION = "device_credentials"


class CredentialStoreUnavailable(Exception):
    """MongoDB did not answer; the caller should retry (UNAVAILABLE)."""


class TokenExists(Exception):
    """The device or account already has a token (``args[0]``: its ``Subject``)."""


class NoToken(Exception):
    """No token was ever issued for the device or account (``args[0]``: its ``Subject``)."""


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

    async def register(self, subject: Subject) -> IssuedToken:
        """The first token of ``subject``; TokenExists if it has one (live or revoked)."""
        issued = issue_token(subject)
        try:
            with _unavailable():
                await self._ensure_index()
                await self._collection.insert_one(
                    {"_id": _document_id(subject), **_fields(issued.credential)}
                )
        except DuplicateKeyError:
            raise TokenExists(subject) from None
        return issued

    async def rotate(self, subject: Subject) -> IssuedToken:
        issued = issue_token(subject)
        with _unavailable():
            await self._ensure_index()
            previous = await self._collection.find_one_and_update(
                {"_id": _document_id(subject)},
                {"$set": _fields(issued.credential)},
                return_document=ReturnDocument.BEFORE,
            )
        if previous is None:
            raise NoToken(subject)
        self._cache.pop(previous["key_id"], None)
        return issued

    async def revoke(self, subject: Subject) -> None:
        with _unavailable():
            previous = await self._collection.find_one_and_update(
                {"_id": _document_id(subject)}, {"$set": {"revoked_at": datetime.now(UTC)}}
            )
        if previous is None:
            raise NoToken(subject)
        self._cache.pop(previous["key_id"], None)

    async def _ensure_index(self) -> None:
        async with self._indexed:
            if not self._has_index:
                await self._collection.create_index([("key_id", ASCENDING)], unique=True)
                self._has_index = True


def _unavailable() -> AbstractContextManager[None]:
    return transient_as(CredentialStoreUnavailable, "credential store (MongoDB)")


# The field that holds the id a token speaks for, by kind.
_ID_FIELD = {TokenKind.DEVICE: "device_id", TokenKind.ACCOUNT: "account_id"}


def _document_id(subject: Subject) -> str:
    return subject.id if subject.kind == TokenKind.DEVICE else f"{subject.kind}/{subject.id}"


def _fields(credential: Credential) -> dict[str, object]:
    subject = credential.subject
    return {
        "kind": subject.kind.value,
        _ID_FIELD[subject.kind]: subject.id,
        "key_id": credential.key_id,
        "secret_sha256": credential.secret_sha256,
        "issued_at": datetime.now(UTC),
        "revoked_at": None,
    }


def _credential(document: dict) -> Credential:
    kind = TokenKind(document.get("kind", TokenKind.DEVICE))
    return Credential(
        subject=Subject(kind, document[_ID_FIELD[kind]]),
        key_id=document["key_id"],
        secret_sha256=document["secret_sha256"],
        revoked_at=document.get("revoked_at"),
    )
