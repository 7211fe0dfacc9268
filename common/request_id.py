"""One id per request, from the caller's RPC to the broker message, on every log line.

The gateway takes the caller's ``x-request-id`` (or makes one), gRPC servers bind it to
this module's contextvar for the call (``common.interceptors``), outgoing gRPC calls
and published messages carry it on, and ``RequestIdLogFilter`` adds it to each log record
written while it is bound, so one grep for the id finds every service's lines.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

# The gRPC metadata key and the AMQP message header: one name on every hop.
REQUEST_ID_HEADER = "x-request-id"
# The log record attribute (a JSON key, or ``request_id=...`` in text logs).
LOG_FIELD = "request_id"
# A caller's id is kept only if it is short and plain, so it cannot forge log lines or
# bloat headers; anything else is replaced by a fresh id.
_ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept(value: str | bytes | None) -> str:
    """The caller's id if it is acceptable, else a new one."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value and _ACCEPTED.fullmatch(value):
        return value
    return new_request_id()


def current() -> str | None:
    """The id of the request being handled, or None outside one."""
    return _current.get()


@contextmanager
def bound(request_id: str) -> Iterator[str]:
    """Make ``request_id`` the current one for the block (one RPC, one message)."""
    token = _current.set(request_id)
    try:
        yield request_id
    finally:
        _current.reset(token)


def message_headers() -> dict[str, str] | None:
    """AMQP headers carrying the current id, or None (no header table at all) without one."""
    request_id = _current.get()
    return {REQUEST_ID_HEADER: request_id} if request_id else None


def from_message_headers(headers: Mapping[str, Any] | None) -> str | None:
    """The id an aio-pika message carries (``message.headers``), or None."""
    value = (headers or {}).get(REQUEST_ID_HEADER)
    if isinstance(value, bytes):  # AMQP long strings may arrive as bytes
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) and value else None


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every record written while a request id is bound.

    Installed on the handler (``common.logging``), so records of every logger get it;
    records outside a request get no such field rather than a null one.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id is not None and not hasattr(record, LOG_FIELD):
            setattr(record, LOG_FIELD, request_id)
        return True
