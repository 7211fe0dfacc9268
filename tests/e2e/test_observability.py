"""A real Prometheus scrapes the running services; every dashboard and alert query runs on it.

Traffic of every kind goes through the stack first (readings accepted, rejected and
resent, a poison message, an unregistered device, bills and usage read back), so that
each panel has something to show. A panel query that returns nothing fails the test.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import grpc
import httpx
import pytest
import yaml

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from common.rabbit import ROUTING_KEY, Topology
from tests.conftest import ADMIN_TOKEN, RABBITMQ_URL, free_port, wait_until
from tests.dashboards import metric_names, panel_queries
from tests.e2e.conftest import Stack
from tests.prometheus_files import alert_expressions

ROOT = Path(__file__).parents[2]
SERVICES = {
    "gateway": "GATEWAY",
    "ingestion": "INGESTION",
    "billing": "BILLING",
    "analytics": "ANALYTICS",
}


def binary(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(found).exists(), f"{name} is missing: run `make services`"
    return found


@pytest.fixture(scope="module")
async def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Prometheus of the test's own, scraping the stack every second, with the alert rules."""
    folder = tmp_path_factory.mktemp("prometheus")
    jobs = [
        {
            "job_name": job,
            "static_configs": [{"targets": [f"127.0.0.1:{stack.ports[f'{prefix}_METRICS_PORT']}"]}],
        }
        for job, prefix in SERVICES.items()
    ]
    jobs += [
        {
            "job_name": "rabbitmq",
            "metrics_path": "/metrics/per-object",
            "static_configs": [{"targets": ["127.0.0.1:15692"]}],
        },
        {"job_name": "redis", "static_configs": [{"targets": ["127.0.0.1:9121"]}]},
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deployments" / "prometheus" / "alerts.yml")],
        "scrape_configs": jobs,
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        binary("prometheus"),
        f"--config.file={folder / 'prometheus.yml'}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                return (await client.get(f"{url}/-/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    await wait_until(ready, what="Prometheus ready")
    yield url
    process.terminate()
    await process.wait()


async def query(url: str, expr: str) -> dict:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{url}/api/v1/query", params={"query": expr})
    return response.json()


def reading(device: str, minutes_ago: int, kwh: float = 0.5) -> gateway_pb2.SendReadingRequest:
    message = reading_pb2.Reading(device_id=device, usage_kwh=kwh)
    message.timestamp.FromDatetime(
        datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=minutes_ago)
    )
    return gateway_pb2.SendReadingRequest(reading=message)


async def traffic(stack: Stack) -> None:
    """Every kind of event a panel shows, through the real entry points."""
    ledger = stack.ledger()
    catalog = (ROOT / "deployments" / "tariffs.yaml").read_text()
    await MongoCatalog(ledger.database).save(catalog, "deployments/tariffs.yaml")
    ledger.close()
    async with gateway_channel(stack.gateway, ADMIN_TOKEN) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        devices = [f"meter-00{i}" for i in range(1, 7)] + ["stranger-1"]
        requests = [
            reading(d, m, 0.1 * (i + 1)) for i, d in enumerate(devices) for m in range(1, 20)
        ]

        async def stream():
            for request in requests + requests[:10] + [reading("bad id", 1)]:
                yield request

        answer = await stub.SendReadings(stream(), timeout=30)
        assert answer.rejected_count == 1
        for request in requests[:5]:
            await stub.SendReading(request, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.SendReading(reading("meter-001", -600), timeout=10)  # future: rejected
        await wait_until(lambda: _billed(stack, len(requests)), what="readings billed")
        # Billing may bill the readings before its next reload of the catalog saved above.
        await wait_until(lambda: _bill_answered(stub, "meter-001"), what="the catalog loaded")
        await stub.GetLatestReading(
            billing_pb2.GetLatestReadingRequest(device_id="meter-001"), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetDeviceBill(
                billing_pb2.GetDeviceBillRequest(device_id="nobody"), timeout=10
            )
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(Topology(stack.prefix).exchange)
        await exchange.publish(aio_pika.Message(b"{poison"), ROUTING_KEY)


async def _bill_answered(stub: gateway_pb2_grpc.GatewayStub, device_id: str) -> bool:
    try:
        await stub.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id=device_id), timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION:  # no catalog loaded yet
            return False
        raise
    return True


async def _billed(stack: Stack, count: int) -> bool:
    return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) >= count


@pytest.fixture(scope="module")
async def scraped(stack: Stack, prometheus: str) -> str:
    await traffic(stack)

    async def everything_scraped() -> bool:
        billed = await query(prometheus, "max_over_time(energy_billed_amount[5m])")
        dead = await query(prometheus, 'sum(consumer_messages_total{outcome="dead_lettered"})')
        targets = await query(prometheus, "count(up == 1)")
        return (
            bool(billed["data"]["result"])
            and bool(dead["data"]["result"])
            and float(dead["data"]["result"][0]["value"][1]) >= 2
            and targets["data"]["result"]
            and targets["data"]["result"][0]["value"][1] == "6"
        )

    await wait_until(everything_scraped, timeout_s=60, what="Prometheus to see all of it")
    # Two more scrapes of every target, so rate() over 1m has two points or more for every
    # series seen so far: a scrape of each after the latest scrape of any, twice over.
    for _ in range(2):
        latest = await _last_scrape(prometheus, "max")

        async def all_scraped_again(since: float = latest) -> bool:
            return await _last_scrape(prometheus, "min") > since

        await wait_until(all_scraped_again, timeout_s=60, what="every target scraped again")
    return prometheus


async def _last_scrape(url: str, over_targets: str) -> float:
    """The ``min`` or ``max`` over the targets of the time of their latest scrape."""
    answer = await query(url, f"{over_targets}(timestamp(up))")
    return float(answer["data"]["result"][0]["value"][1])


async def test_every_dashboard_panel_query_returns_data(scraped: str) -> None:
    empty, failed = [], []
    for dashboard, title, expr in panel_queries():
        answer = await query(scraped, expr)
        if answer.get("status") != "success":
            failed.append(f"{dashboard} / {title}: {expr}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            empty.append(f"{dashboard} / {title}: {expr}")
    assert not failed, "queries Prometheus refused:\n" + "\n".join(failed)
    assert not empty, "panel queries that returned nothing:\n" + "\n".join(empty)


async def test_every_alert_expression_runs(scraped: str) -> None:
    for name, expr in alert_expressions().items():
        answer = await query(scraped, expr)
        assert answer.get("status") == "success", (name, answer.get("error"))
    async with httpx.AsyncClient(timeout=10) as client:
        rules = (await client.get(f"{scraped}/api/v1/rules")).json()["data"]["groups"]
    loaded = {rule["name"] for group in rules for rule in group["rules"]}
    assert loaded == set(alert_expressions())
    health = {rule["name"]: rule["health"] for group in rules for rule in group["rules"]}
    assert set(health.values()) <= {"ok", "unknown"}, health


async def test_every_exposition_passes_promtool_and_has_what_panels_use(
    stack: Stack, scraped: str
) -> None:
    exported: set[str] = set()
    urls = [stack.metrics_url(prefix) for prefix in SERVICES.values()]
    urls += ["http://127.0.0.1:15692/metrics/per-object", "http://127.0.0.1:9121/metrics"]
    async with httpx.AsyncClient(timeout=10) as client:
        for url in urls:
            text = (await client.get(url)).text
            exported |= {
                line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")
            }
            if url in urls[:4]:  # our own services; the others are not ours to lint
                lint = await asyncio.create_subprocess_exec(
                    binary("promtool"),
                    "check",
                    "metrics",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                output, _ = await lint.communicate(text.encode())
                assert lint.returncode == 0, (url, output.decode())
    used = {metric for _, _, expr in panel_queries() for metric in metric_names(expr)}
    synthetic = {"up"}  # made by Prometheus for every target, not exported
    missing = {m for m in used - synthetic if m not in exported and _family(m) not in exported}
    assert not missing, f"panels use metrics no service exports: {sorted(missing)}"


def _family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
