"""Running a service's main coroutine on uvloop (the default) or the standard event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal

import uvloop

EventLoop = Literal["uvloop", "asyncio"]


def run(main: Coroutine[Any, Any, None], event_loop: EventLoop) -> None:
    """uvloop runs socket and timer callbacks in C: less CPU per message and per RPC."""
    if event_loop == "uvloop":
        uvloop.run(main)
    else:
        asyncio.run(main)
