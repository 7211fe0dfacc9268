"""analytics' background calls to billing, with a fake client: retried, counted, logged once."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from analytics_service import billing_sync
from analytics_service.adapters.billing import BillingCallFailed, CatalogIds
from analytics_service.billing_sync import CatalogView, FailureLog, restore_activity
from analytics_service.domain.tally import Tally, Windows
from common.retry import RetryPolicy

LOADED_AT = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)


class FakeBilling:
    """Answers from a script: an exception is raised, anything else returned."""

    def __init__(self, *answers: object) -> None:
        self._answers = list(answers)
        self.known: list[datetime | None] = []

    def _next(self) -> object:
        answer = self._answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def latest_timestamps(self) -> object:
        return self._next()

    async def catalog_ids(self, known_loaded_at: datetime | None) -> object:
        self.known.append(known_loaded_at)
        return self._next()


def failures(rpc: str, kind: str) -> float:
    labels = {"rpc": rpc, "kind": kind}
    return REGISTRY.get_sample_value("analytics_billing_sync_failures_total", labels) or 0.0


def unavailable(rpc: str) -> BillingCallFailed:
    return BillingCallFailed(rpc, "UNAVAILABLE", "failed to connect to all addresses")


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(billing_sync, "WAIT_FOR_DEPENDENCY", RetryPolicy(0.001, 0.001, None))


async def test_activity_is_restored_once_billing_answers(caplog) -> None:
    caplog.set_level(logging.INFO, logger=billing_sync.__name__)
    before = failures("StreamLatestTimestamps", "UNAVAILABLE")
    now = datetime.now(UTC)  # at run time: in random order the module may be imported long before
    billing = FakeBilling(
        unavailable("StreamLatestTimestamps"),
        unavailable("StreamLatestTimestamps"),
        {"meter-1": now - timedelta(minutes=5), "meter-2": now - timedelta(hours=2)},
    )
    tally = Tally(Windows(), 1000)
    assert await restore_activity(billing, tally, give_up_after_s=60) == 2  # type: ignore[arg-type]
    assert tally.active_devices() == ["meter-1"] and tally.silent_devices() == 1
    assert failures("StreamLatestTimestamps", "UNAVAILABLE") == before + 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("could not get the devices' latest readings from billing; retrying") == 1
    assert "got the devices' latest readings from billing again" in messages


async def test_restoring_stops_after_the_forget_horizon() -> None:
    billing = FakeBilling(unavailable("StreamLatestTimestamps"))
    tally = Tally(Windows(), 1000)
    assert await restore_activity(billing, tally, give_up_after_s=0) == 0  # type: ignore[arg-type]
    assert tally.active_devices() == []


async def test_the_catalog_view_is_replaced_whole_and_kept_when_unchanged() -> None:
    view = CatalogView()
    assert not view.is_registered("meter-1") and view.account_ids() == []
    ids = CatalogIds(LOADED_AT, frozenset({"meter-1"}), ("acme",))
    billing = FakeBilling(ids, None)
    await view.refresh(billing)  # type: ignore[arg-type]
    await view.refresh(billing)  # type: ignore[arg-type]
    assert billing.known == [None, LOADED_AT]
    assert view.is_registered("meter-1") and not view.is_registered("meter-2")
    assert view.account_ids() == ["acme"]


def test_failures_are_logged_once_per_kind_and_each_counted(caplog) -> None:
    caplog.set_level(logging.INFO, logger=billing_sync.__name__)
    log = FailureLog("StreamCatalogIds", "the tariff catalog")
    before = failures("StreamCatalogIds", "FAILED_PRECONDITION")
    precondition = BillingCallFailed("StreamCatalogIds", "FAILED_PRECONDITION", "make seed")
    for _ in range(3):
        log.failed(precondition)
    log.failed(ValueError("a bug"))
    log.failed(ValueError("a bug"))
    log.succeeded()
    log.succeeded()
    assert failures("StreamCatalogIds", "FAILED_PRECONDITION") == before + 3
    assert [(r.levelname, getattr(r, "kind", None)) for r in caplog.records] == [
        ("WARNING", "FAILED_PRECONDITION"),
        ("ERROR", "ValueError"),
        ("INFO", None),
    ]
    error_info = caplog.records[1].exc_info
    assert error_info and error_info[0] is ValueError, "an unexpected failure keeps its traceback"
