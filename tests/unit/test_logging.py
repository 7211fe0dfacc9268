"""Log lines: JSON for machines, one readable line for a person (LOG_FORMAT=text)."""

from __future__ import annotations

import json
import logging

import pytest

from common.logging import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging(restore_root_logging: None) -> None:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""


def test_json_lines_carry_the_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("billing_service", "INFO", "json")
    logging.getLogger("billing_service.consumer").warning("retrying", extra={"attempt": 2})
    record = json.loads(capsys.readouterr().out)
    assert record["message"] == "retrying" and record["attempt"] == 2
    assert record["service"] == "billing_service" and record["level"] == "WARNING"


def test_text_lines_are_readable_and_keep_the_extra_fields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("billing_service", "INFO", "text")
    logging.getLogger("billing_service.consumer").warning("retrying", extra={"attempt": 2})
    line = capsys.readouterr().out.strip()
    assert line.endswith("WARNING billing_service.consumer: retrying attempt=2"), line
