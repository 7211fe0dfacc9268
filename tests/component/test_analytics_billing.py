"""Analytics learns the catalog and device activity only through billing's gRPC API.

Billing's two RPCs for analytics (``StreamCatalogIds``, ``StreamLatestTimestamps``) are
called on a real billing server on port 0 backed by SecantusDB and Redis; then analytics
is started before billing exists, and again after a restart, and must get both through it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from prometheus_client import REGISTRY

from analytics_service.app import AnalyticsApp
from analytics_service.settings import AnalyticsSettings
from billing_service.adapters.mongo import MongoCatalog
from billing_service.api import STREAM_CHUNK
from billing_service.app import BillingApp
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.errors import Reason, error_info
from common.models import Reading, validate_reading
from tests.component.test_billing import cleanup, settings
from tests.conftest import RABBITMQ_URL, delete_topology, free_port, wait_until

TARIFFS = """
default_tariff: flat
tariffs:
  - id: flat
    currency: EUR
    time_zone: Europe/Berlin
    energy: {kind: flat, price_per_kwh: "0.30"}
"""
# More ids than two chunks hold, so the streams must split them.
FLEET = 2 * STREAM_CHUNK + 1


def catalog(devices: int, accounts: int = 3) -> str:
    lines = [TARIFFS, "accounts:"]
    lines += [f"  - {{id: acct-{a}, name: Account {a}}}" for a in range(accounts)]
    lines.append("devices:")
    lines += [
        f"  - {{id: meter-{d}, account: acct-{d % accounts}, site: s, tariff: flat}}"
        for d in range(devices)
    ]
    return "\n".join(lines) + "\n"


def reading(device: str, minutes_ago: float) -> Reading:
    """A reading ``minutes_ago`` before now: now at the call, not at import (in random order
    a module may be imported many minutes before its tests run)."""
    now = datetime.now(UTC).replace(microsecond=0)
    return validate_reading(device, now - timedelta(minutes=minutes_ago), 0.5, now=now)


async def start_billing(prefix: str, port: int = 0, **update: object) -> BillingApp:
    app = BillingApp(settings(prefix).model_copy(update={"port": port, **update}))
    await app.start()
    return app


@pytest.fixture
async def billing(prefix: str) -> AsyncIterator[BillingApp]:
    app = BillingApp(settings(prefix))
    await MongoCatalog(app.ledger.database).save(catalog(FLEET), "test catalog")
    await app.start()
    yield app
    await app.stop()
    await cleanup(prefix, app)


async def catalog_chunks(
    app: BillingApp, known: datetime | None = None
) -> list[billing_pb2.StreamCatalogIdsResponse]:
    request = billing_pb2.StreamCatalogIdsRequest()
    if known is not None:
        request.known_loaded_at.FromDatetime(known)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = billing_pb2_grpc.BillingStub(channel)
        return [chunk async for chunk in stub.StreamCatalogIds(request, timeout=10)]


async def latest_chunks(app: BillingApp) -> list[billing_pb2.StreamLatestTimestampsResponse]:
    request = billing_pb2.StreamLatestTimestampsRequest()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = billing_pb2_grpc.BillingStub(channel)
        return [chunk async for chunk in stub.StreamLatestTimestamps(request, timeout=10)]


async def test_catalog_ids_come_in_chunks_and_not_again_when_unchanged(billing) -> None:
    chunks = await catalog_chunks(billing)
    assert len(chunks) == 3
    assert all(len(c.device_ids) <= STREAM_CHUNK for c in chunks)
    assert max(c.ByteSize() for c in chunks) < 1_000_000
    devices = [d for c in chunks for d in c.device_ids]
    assert len(devices) == FLEET and set(devices) == {f"meter-{d}" for d in range(FLEET)}
    assert [a for c in chunks for a in c.account_ids] == ["acct-0", "acct-1", "acct-2"]
    stored = await MongoCatalog(billing.ledger.database).load()
    assert stored is not None
    assert {c.loaded_at.ToDatetime(tzinfo=UTC) for c in chunks} == {stored.loaded_at}
    assert not any(c.unchanged for c in chunks)

    again = await catalog_chunks(billing, known=stored.loaded_at)
    assert len(again) == 1 and again[0].unchanged and not again[0].device_ids

    older = await catalog_chunks(billing, known=stored.loaded_at - timedelta(seconds=1))
    assert sum(len(c.device_ids) for c in older) == FLEET


async def test_latest_timestamps_stream_every_cached_device(billing) -> None:
    planted = [reading(f"meter-{d}", minutes_ago=d % 120) for d in range(FLEET)]
    await billing.cache.mark_changed([], planted)
    await billing.cache.put_latest(reading("meter-0", minutes_ago=200))  # older: ignored
    chunks = await latest_chunks(billing)
    assert len(chunks) == 3 and all(len(c.devices) <= STREAM_CHUNK for c in chunks)
    got = {d.device_id: d.timestamp.ToDatetime(tzinfo=UTC) for c in chunks for d in c.devices}
    assert got == {r.device_id: r.timestamp for r in planted}


async def test_no_catalog_is_failed_precondition_and_redis_down_is_unavailable(prefix) -> None:
    # Nothing on this port: billing's Redis is down from the start (it starts without it).
    app = await start_billing(
        prefix, redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_s=0.5
    )
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog_chunks(app)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "make seed" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await latest_chunks(app)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry shortly" in (caught.value.details() or "")
        info = error_info(caught.value)  # billing answered: its store failed, not billing
        assert info is not None and info.reason == Reason.STORE_UNAVAILABLE
        assert dict(info.metadata) == {"service": "billing"}
    finally:
        await app.stop()
        await cleanup(prefix, app)


def sync_failures(rpc: str) -> float:
    labels = {"rpc": rpc, "kind": "UNAVAILABLE"}
    return REGISTRY.get_sample_value("analytics_billing_sync_failures_total", labels) or 0.0


async def has_restored(app: AnalyticsApp) -> bool:
    return (
        sorted(app.tally.active_devices()) == ["meter-2", "stranger-1"]
        and app.tally.silent_devices() == 1
        and app.catalog.is_registered("meter-1")
        and not app.catalog.is_registered("stranger-1")
        and app.catalog.account_ids() == ["acct-0", "acct-1", "acct-2"]
    )


async def test_analytics_gets_activity_and_catalog_from_billing_after_a_restart(
    prefix, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="analytics_service.billing_sync")
    port = free_port()
    analytics_settings = AnalyticsSettings(
        rabbitmq_url=RABBITMQ_URL,
        topology_prefix=prefix,
        billing_addr=f"127.0.0.1:{port}",
        billing_timeout_s=2,
        catalog_refresh_s=0.2,
        billed_refresh_s=0.2,
        shutdown_grace_s=1,
    )
    before = {rpc: sync_failures(rpc) for rpc in ("StreamCatalogIds", "StreamLatestTimestamps")}
    analytics = AnalyticsApp(analytics_settings)
    billing: BillingApp | None = None
    try:
        await analytics.start()  # billing is not up: analytics starts all the same

        async def retried() -> bool:
            return all(sync_failures(rpc) >= count + 2 for rpc, count in before.items())

        await wait_until(retried, what="analytics to retry billing twice per RPC")
        assert analytics.tally.active_devices() == [] and analytics.catalog.account_ids() == []

        billing = BillingApp(settings(prefix).model_copy(update={"port": port}))
        await MongoCatalog(billing.ledger.database).save(catalog(3), "test catalog")
        for r in (reading("meter-1", 90), reading("meter-2", 5), reading("stranger-1", 5)):
            await billing.cache.put_latest(r)
        await billing.start()

        await wait_until(lambda: has_restored(analytics), what="activity and catalog via billing")
        assert REGISTRY.get_sample_value("energy_unregistered_devices") == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        # Logged once per kind of failure, however often it was retried.
        assert sorted(getattr(r, "rpc", "") for r in warnings) == [
            "StreamCatalogIds",
            "StreamLatestTimestamps",
        ], [r.getMessage() for r in warnings]

        await analytics.stop()
        failed = {rpc: sync_failures(rpc) for rpc in before}
        analytics = AnalyticsApp(analytics_settings)  # the restart
        await analytics.start()
        await wait_until(lambda: has_restored(analytics), what="restored after the restart")
        assert {rpc: sync_failures(rpc) for rpc in before} == failed
    finally:
        await analytics.stop()
        if billing is not None:
            await billing.stop()
            await cleanup(prefix, billing)
        else:
            await delete_topology(prefix)
