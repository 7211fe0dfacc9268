"""GATEWAY_HTTP_* settings: defaults, and the HTTP port apart from the others."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from api_gateway.settings import GatewaySettings


def test_http_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_HTTP_PORT", raising=False)  # tests/conftest.py sets 0
    settings = GatewaySettings(admin_token="x" * 16)
    assert (settings.http_port, settings.http_max_body_bytes) == (8080, 4 * 1024 * 1024)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"http_port": 50051}, "GATEWAY_HTTP_PORT (50051) must differ from GATEWAY_PORT"),
        ({"http_port": 9101}, "must differ from GATEWAY_METRICS_PORT"),
        ({"http_port": 70000}, "less than or equal to 65535"),
        ({"http_max_body_bytes": 10}, "greater than or equal to 1024"),
    ],
)
def test_bad_http_settings_fail_at_start(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        GatewaySettings(admin_token="x" * 16, **changes)  # type: ignore[arg-type]
