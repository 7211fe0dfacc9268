"""Retrying a call that failed for a reason time can cure: one helper for every service.

Every retry is counted (``retries_total{operation}``), logged once per attempt with the
error, and waits a jittered exponential backoff. A policy is bounded by ``max_attempts``,
except where waiting is the right answer and it says so with ``UNTIL_IT_SUCCEEDS``:
- billing holding a batch unacked while MongoDB is down (nothing may be acked before it is
  written; the backlog stays in the broker). Alert: BillingStoreDown.
- a service waiting at start for the broker or store it cannot work without.
``operation`` is one of a few fixed names per service, never an id, so the label stays
bounded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import Counter

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = Counter(
    "retries_total", "Calls retried after a failure time can cure, by operation.", ["operation"]
)
UNTIL_IT_SUCCEEDS = None


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff from ``initial_s`` doubling up to ``max_s`` (full jitter), ``max_attempts``
    calls in all (``UNTIL_IT_SUCCEEDS``: no bound)."""

    initial_s: float
    max_s: float
    max_attempts: int | None

    def delay_s(self, attempt: int) -> float:
        # The exponent is capped: a wait of hours would overflow a float otherwise.
        return random.uniform(0, min(self.max_s, self.initial_s * 2 ** min(attempt - 1, 60)))


# A service starting before the broker or store it needs waits for it (the supervisor sees
# it NOT_SERVING, not crash-looping).
WAIT_FOR_DEPENDENCY = RetryPolicy(initial_s=0.5, max_s=10.0, max_attempts=UNTIL_IT_SUCCEEDS)


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    operation: str,
    policy: RetryPolicy,
    retry_on: tuple[type[BaseException], ...],
    retry_if: Callable[[BaseException], bool] = lambda error: True,
    on_retry: Callable[[], None] | None = None,
    context: dict[str, object] | None = None,
) -> T:
    """``await call()`` until it returns; on ``retry_on`` (that ``retry_if`` accepts) wait
    and call again, within ``policy``; the last failure of a bounded policy is raised."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except retry_on as error:
            if not retry_if(error):
                raise
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                raise
            delay_s = policy.delay_s(attempt)
            RETRIES.labels(operation).inc()
            if on_retry is not None:
                on_retry()
            log.warning(
                "%s failed, retrying",
                operation,
                extra={
                    "operation": operation,
                    "attempt": attempt,
                    "delay_s": round(delay_s, 3),
                    "error": str(error) or repr(error),
                    **(context or {}),
                },
            )
            await asyncio.sleep(delay_s)
