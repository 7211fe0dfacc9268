"""The one retry helper: bounded unless told otherwise, every retry counted and logged."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from common.retry import UNTIL_IT_SUCCEEDS, RetryPolicy, retrying

FAST = RetryPolicy(initial_s=0.001, max_s=0.002, max_attempts=3)


class Flaky:
    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def retries(operation: str) -> float:
    return REGISTRY.get_sample_value("retries_total", {"operation": operation}) or 0.0


async def test_a_bounded_policy_gives_up_with_the_last_error() -> None:
    call, before = Flaky(5, ConnectionError("refused")), retries("test_bounded")
    with pytest.raises(ConnectionError, match="refused"):
        await retrying(call, operation="test_bounded", policy=FAST, retry_on=(ConnectionError,))
    assert call.calls == 3
    assert retries("test_bounded") - before == 2


async def test_until_it_succeeds_waits_out_any_number_of_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    patient = RetryPolicy(initial_s=0.001, max_s=0.001, max_attempts=UNTIL_IT_SUCCEEDS)
    call, hooks = Flaky(20, TimeoutError("slow")), []
    result = await retrying(
        call,
        operation="test_unbounded",
        policy=patient,
        retry_on=(TimeoutError,),
        on_retry=lambda: hooks.append(1),
        context={"readings": 7},
    )
    assert (result, call.calls, len(hooks)) == ("done", 21, 20)
    warnings = [r for r in caplog.records if r.getMessage() == "test_unbounded failed, retrying"]
    assert len(warnings) == 20 and warnings[-1].readings == 7 and warnings[-1].attempt == 20


async def test_an_error_it_is_not_told_to_retry_passes_at_once() -> None:
    call = Flaky(1, ValueError("bad input"))
    with pytest.raises(ValueError):
        await retrying(call, operation="test_other", policy=FAST, retry_on=(ConnectionError,))
    assert call.calls == 1


def test_the_backoff_grows_to_its_cap() -> None:
    policy = RetryPolicy(initial_s=1.0, max_s=4.0, max_attempts=None)
    assert all(0 <= policy.delay_s(1) <= 1.0 for _ in range(50))
    assert all(0 <= policy.delay_s(10) <= 4.0 for _ in range(50))
    assert max(policy.delay_s(10) for _ in range(200)) > 2.0
    assert 0 <= policy.delay_s(100_000) <= 4.0  # hours of waiting: still a number


async def test_retry_if_narrows_the_errors_retried() -> None:
    call = Flaky(1, ConnectionError("permanent"))
    with pytest.raises(ConnectionError):
        await retrying(
            call,
            operation="test_narrowed",
            policy=FAST,
            retry_on=(ConnectionError,),
            retry_if=lambda error: "transient" in str(error),
        )
    assert call.calls == 1
