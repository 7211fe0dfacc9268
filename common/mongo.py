"""MongoDB for every service: the one module that imports motor.

One client factory (timeouts on selection, connect and socket; timezone-aware datetimes)
and one mapping of driver errors to "transient" (a retry can cure it: the server is down,
slow or switching primaries) versus everything else. motor reaches end of support in May
2027; moving to PyMongo's async client (``pymongo.AsyncMongoClient``) changes this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from motor.motor_asyncio import (
    AsyncIOMotorClient,
    AsyncIOMotorCollection,
    AsyncIOMotorDatabase,
)
from pymongo import errors

Database = AsyncIOMotorDatabase
Collection = AsyncIOMotorCollection

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    errors.AutoReconnect,
    errors.ConnectionFailure,
    errors.ExecutionTimeout,
    errors.NetworkTimeout,
    errors.ServerSelectionTimeoutError,
    errors.WriteConcernError,
)


def connect(url: str, database: str, timeout_s: float) -> Database:
    """A database on a client of its own, with ``timeout_s`` on every wait."""
    timeout_ms = int(timeout_s * 1000)
    client: AsyncIOMotorClient = AsyncIOMotorClient(
        url,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=timeout_ms,
        tz_aware=True,
    )
    return client[database]


@contextmanager
def transient_as(failure: Callable[[str], Exception], what: str = "MongoDB") -> Iterator[None]:
    """Raise ``failure("<what>: <error>")`` for a transient driver error; others pass."""
    try:
        yield
    except TRANSIENT_ERRORS as error:
        raise failure(f"{what}: {error}") from error
