"""The ``stacks`` fixture of the fault tests: the four services as processes, cleaned up."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Stack


@pytest.fixture
async def stacks(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    """Start a stack of the test's own (``extra_env`` overrides settings); stop and clean it."""
    started: list[Stack] = []

    async def make(**extra_env: str) -> Stack:
        stack = Stack(prefix=f"f{uuid.uuid4().hex[:8]}-", log_dir=tmp_path, extra_env=extra_env)
        await stack.start()
        started.append(stack)
        return stack

    yield make
    for stack in started:
        await stack.stop()
        await stack.clean()
