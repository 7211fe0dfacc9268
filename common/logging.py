"""Structured JSON logs to stdout, one object a line, with the service name on each; or,
for a person at a terminal (``make dev``), one readable line with the same fields."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from common.request_id import RequestIdLogFilter

# The attributes every LogRecord has; the others came from extra= (reading_id, ...).
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """``12:00:01 WARNING billing_service.consumer: store unavailable, retrying attempt=2``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD]
        head, _, trace = line.partition("\n")
        return " ".join([head, *extra]) + (f"\n{trace}" if trace else "")


def configure_logging(service: str, level: str = "INFO", log_format: str = "json") -> None:
    """Send every record to stdout, as JSON (extra= fields become keys) or as text."""
    handler = logging.StreamHandler(sys.stdout)
    if log_format == "text":
        handler.setFormatter(TextFormatter())
    else:
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                static_fields={"service": service},
                timestamp=False,
            )
        )
    # On the handler, not the root logger: a logger's filters skip records propagated
    # from its children, a handler's see them all.
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aio-pika and aiormq log every reconnect attempt with a traceback at WARNING.
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.ERROR))
