"""The request id: which ids are kept, and the log field every line of a request gets."""

from __future__ import annotations

import json
import logging

import pytest

from common import request_id
from common.logging import configure_logging
from common.request_id import REQUEST_ID_HEADER, accept, bound, from_message_headers


@pytest.fixture(autouse=True)
def _restore_logging(restore_root_logging: None) -> None:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""


def test_a_plain_id_is_kept_anything_else_replaced() -> None:
    assert accept("req-42_a.b:c/d+e=") == "req-42_a.b:c/d+e="
    assert accept(b"from-bytes") == "from-bytes"
    for unfit in (None, "", "has space", "x" * 129, 'quote"d', "new\nline"):
        replaced = accept(unfit)
        assert replaced != unfit and len(replaced) == 32


def test_every_line_written_while_bound_carries_the_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("api_gateway", "INFO", "json")
    log = logging.getLogger("api_gateway.api")
    with bound("req-1"):
        log.warning("inside")
    log.warning("outside")
    inside, outside = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert inside["request_id"] == "req-1"
    assert "request_id" not in outside
    assert request_id.current() is None


def test_message_headers_carry_the_bound_id() -> None:
    assert request_id.message_headers() is None
    with bound("req-2"):
        headers = request_id.message_headers()
    assert headers == {REQUEST_ID_HEADER: "req-2"}
    assert from_message_headers(headers) == "req-2"
    assert from_message_headers({REQUEST_ID_HEADER: b"req-3"}) == "req-3"
    assert from_message_headers(None) is None and from_message_headers({}) is None
