"""The gateway's HTTP/JSON API with a real HTTP client, against a gateway with real ingestion
and billing on the real RabbitMQ, Redis and SecantusDB.

Every route, every error status with the message a gRPC caller gets, batches with bad rows,
idempotent resends over both transports, the body limit, the OpenAPI document and the page.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from api_gateway.app import GatewayApp
from api_gateway.http.server import OPENAPI_FILE
from api_gateway.settings import GatewaySettings
from billing_service.adapters.mongo import MongoCatalog
from billing_service.app import BillingApp
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.component.test_billing import cleanup, settings
from tests.conftest import (
    ACME_CATALOG,
    ADMIN_TOKEN,
    REDIS_URL,
    delete_topology,
    free_port,
    wait_until,
)

CATALOG = ACME_CATALOG
NOW = datetime.now(UTC)
# The previous month (in Berlin, the tariff's zone): every reading is in the past.
PERIOD = (NOW.astimezone().replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
BASE = datetime.fromisoformat(f"{PERIOD}-10T08:00:00+00:00")


def at(minutes: int) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def body(device: str, minutes: int, kwh: float = 1.25, **extra: Any) -> dict[str, Any]:
    return {"reading": {"device_id": device, "timestamp": at(minutes), "usage_kwh": kwh, **extra}}


def grpc_request(device: str, minutes: int, kwh: float = 1.25) -> gateway_pb2.SendReadingRequest:
    reading = reading_pb2.Reading(device_id=device, usage_kwh=kwh)
    reading.timestamp.FromDatetime(BASE + timedelta(minutes=minutes))
    return gateway_pb2.SendReadingRequest(reading=reading)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    gateway: GatewayApp
    http: httpx.AsyncClient
    tokens: dict[str, str]

    def grpc(self, token: str | None) -> gateway_pb2_grpc.GatewayStub:
        channel = gateway_channel(f"127.0.0.1:{self.gateway.port}", token)
        self.channels.append(channel)
        return gateway_pb2_grpc.GatewayStub(channel)

    async def grpc_error(self, call: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return caught.value

    def __post_init__(self) -> None:
        self.channels: list[grpc.aio.Channel] = []


async def start_gateway(prefix: str, ingestion: int, billing: int, **overrides: Any) -> GatewayApp:
    app = GatewayApp(
        GatewaySettings(  # type: ignore[arg-type]
            **{
                "port": 0,
                "http_port": 0,
                "ingestion_addr": f"127.0.0.1:{ingestion}",
                "billing_addr": f"127.0.0.1:{billing}",
                "admin_token": ADMIN_TOKEN,
                "mongodb_database": prefix.strip("-"),
                "redis_key_prefix": prefix,
                **overrides,
            }
        )
    )
    await app.start()
    return app


@pytest.fixture(scope="module")
def module_prefix() -> str:
    return f"h{uuid.uuid4().hex[:10]}-"


@pytest.fixture(scope="module")
async def services(module_prefix: str) -> AsyncIterator[tuple[IngestionApp, BillingApp]]:
    prefix = module_prefix
    ingestion = IngestionApp(IngestionSettings(port=0, topology_prefix=prefix, confirm_timeout_s=5))
    # A busy machine (test runs side by side) may take more than 1 s for a first write.
    billing = BillingApp(settings(prefix).model_copy(update={"mongodb_timeout_s": 5}))
    await MongoCatalog(billing.ledger.database).save(CATALOG, "test catalog")
    await billing.start()
    await ingestion.start()
    await ingestion.publisher._connecting
    yield ingestion, billing
    await ingestion.stop()
    await billing.stop()
    await cleanup(prefix, billing)
    await delete_topology(prefix)
    client = aioredis.Redis.from_url(REDIS_URL, socket_timeout=5)
    keys = [key async for key in client.scan_iter(f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture(scope="module")
async def api(module_prefix: str, services: tuple[IngestionApp, BillingApp]) -> AsyncIterator[Api]:
    ingestion, billing = services
    gateway = await start_gateway(module_prefix, ingestion.port, billing.port)
    admin = gateway_pb2_grpc.DeviceAdminStub(
        channel := gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN)
    )
    tokens = {"admin": ADMIN_TOKEN}
    for device in ("meter-1", "meter-2"):
        answer = await admin.RegisterDevice(gateway_pb2.RegisterDeviceRequest(device_id=device))
        tokens[device] = answer.token
    await channel.close()
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=30
    ) as client:
        api = Api(gateway, client, tokens)
        yield api
        for open_channel in api.channels:
            await open_channel.close()
    await gateway.stop()


async def readings_of(api: Api, device: str, count: int, **window: str) -> list[dict[str, Any]]:
    """The device's readings (in ``start``, ``end`` if given) over HTTP, once billing holds
    ``count`` of them."""
    found: list[dict[str, Any]] = []

    async def arrived() -> bool:
        nonlocal found
        answer = await api.http.get(
            f"/v1/devices/{device}/readings",
            params={"page_size": "1000", **window},
            headers=bearer(api.tokens[device]),
        )
        assert answer.status_code == 200, answer.text
        found = answer.json()["readings"]
        return len(found) >= count

    await wait_until(arrived, timeout_s=30, what=f"{count} readings of {device}")
    return found


def http_requests(route: str, status: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_http_requests_total", {"route": route, "method": "GET", "status": status}
    )
    return value or 0.0


async def test_every_route(api: Api) -> None:
    token = bearer(api.tokens["meter-1"])
    one = await api.http.post("/v1/readings", json=body("meter-1", 0), headers=token)
    assert one.status_code == 200, one.text
    assert set(one.json()) == {"reading_id"} and one.headers["x-request-id"]

    batch = [body("meter-1", 15, 1.5), body("meter-1", 30, 1.75), body("meter 2", 30, 0.5)]
    answer = await api.http.post("/v1/readings", json=batch, headers=token)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["accepted"] == 2 and report["rejected_count"] == 1
    [rejected] = report["rejected"]
    assert rejected["index"] == 2 and rejected["device_id"] == "meter 2"
    assert rejected["reason"].startswith("device_id: 'meter 2' is not valid")

    lines = [body("meter-1", 45, 2.0), body("meter-1", 60, -1), body("meter-1", 75, 0.5)]
    ndjson = "\n".join(json.dumps(line) for line in lines) + "\n"
    answer = await api.http.post(
        "/v1/readings",
        content=ndjson,
        headers={**token, "Content-Type": "application/x-ndjson"},
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert (report["accepted"], report["rejected_count"]) == (2, 1)
    assert report["rejected"][0]["index"] == 1
    assert "usage_kwh: is -1.0" in report["rejected"][0]["reason"]

    stored = await readings_of(api, "meter-1", 5)
    assert [r["timestamp"] for r in stored] == [at(m) for m in (0, 15, 30, 45, 75)]
    assert stored[0]["usage_kwh"] == 1.25 and stored[0]["reading_id"] == one.json()["reading_id"]
    page = await api.http.get(
        "/v1/devices/meter-1/readings",
        params={"start": at(10), "end": at(50), "page_size": "2"},
        headers=token,
    )
    assert [r["timestamp"] for r in page.json()["readings"]] == [at(15), at(30)]
    rest = await api.http.get(
        "/v1/devices/meter-1/readings",
        params={"start": at(10), "end": at(50), "page_token": page.json()["next_page_token"]},
        headers=token,
    )
    assert [r["timestamp"] for r in rest.json()["readings"]] == [at(45)]

    latest = await api.http.get("/v1/devices/meter-1/latest", headers=token)
    assert latest.status_code == 200, latest.text
    assert latest.json()["reading"]["timestamp"] == at(75)

    usage = await api.http.get(
        "/v1/devices/meter-1/usage",
        params={"start": at(-60), "end": at(120), "window": "1h", "time_zone": "Europe/Berlin"},
        headers=token,
    )
    assert usage.status_code == 200, usage.text
    buckets = usage.json()["buckets"]
    # A reading counts in the window its interval ends in: 08:00 closes the 07:00 hour.
    assert [b["count"] for b in buckets] == [1, 3, 1]
    assert sum(b["sum_kwh"] for b in buckets) == pytest.approx(1.25 + 1.5 + 1.75 + 2.0 + 0.5)

    bill = await api.http.get("/v1/devices/meter-1/bill", params={"period": PERIOD}, headers=token)
    assert bill.status_code == 200, bill.text
    device_bill = bill.json()["bill"]
    assert (device_bill["device_id"], device_bill["period"]) == ("meter-1", PERIOD)
    assert device_bill["energy_kwh"] == "7" or float(device_bill["energy_kwh"]) == 7.0

    admin = bearer(api.tokens["admin"])
    account = await api.http.get("/v1/accounts/acme/bill", params={"period": PERIOD}, headers=admin)
    assert account.status_code == 200, account.text
    assert account.json()["account_id"] == "acme"
    assert account.json()["status"] == "BILL_STATUS_ESTIMATE"
    over_grpc = await api.grpc(ADMIN_TOKEN).GetAccountBill(
        billing_pb2.GetAccountBillRequest(account_id="acme", period=PERIOD)
    )
    assert account.json()["total"] == over_grpc.total

    bills = await api.http.get("/v1/accounts/acme/bills", params={"page_size": "5"}, headers=admin)
    assert bills.status_code == 200, bills.text
    assert bills.json() == {"bills": [], "next_page_token": ""}


async def test_one_reading_over_http_and_grpc_and_resent(api: Api) -> None:
    token = api.tokens["meter-2"]
    over_grpc = await api.grpc(token).SendReading(grpc_request("meter-2", 300, 0.75), timeout=10)
    over_http = await api.http.post(
        "/v1/readings", json=body("meter-2", 300, 0.75), headers=bearer(token)
    )
    again = await api.http.post(
        "/v1/readings", json=body("meter-2", 300, 0.75), headers=bearer(token)
    )
    assert over_http.status_code == again.status_code == 200
    assert over_http.json()["reading_id"] == again.json()["reading_id"] == over_grpc.reading_id

    # A later reading marks when billing has consumed everything sent before it.
    await api.http.post("/v1/readings", json=body("meter-2", 315, 0.25), headers=bearer(token))
    stored = await readings_of(api, "meter-2", 2, start=at(300), end=at(330))
    assert [r["timestamp"] for r in stored] == [at(300), at(315)]
    window = billing_pb2.ListReadingsRequest(device_id="meter-2")
    window.start.FromJsonString(at(300))
    window.end.FromJsonString(at(330))
    listed = await api.grpc(token).ListReadings(window, timeout=10)
    assert [r.reading_id for r in listed.readings][:1] == [over_grpc.reading_id]
    assert len(listed.readings) == 2


async def same_message(api: Api, answer: httpx.Response, grpc_call: Any) -> dict[str, Any]:
    """The HTTP error body, checked against the gRPC caller's code and message."""
    error = await api.grpc_error(grpc_call)
    payload = answer.json()
    assert payload["code"] == error.code().value[0], payload
    assert payload["message"] == error.details(), payload
    return payload


async def test_errors_carry_the_grpc_message(api: Api) -> None:
    token = api.tokens["meter-1"]
    bad = body("meter-1", 500, -3)
    answer = await api.http.post("/v1/readings", json=bad, headers=bearer(token))
    assert answer.status_code == 400
    payload = await same_message(
        api, answer, api.grpc(token).SendReading(grpc_request("meter-1", 500, -3))
    )
    assert payload["message"] == "usage_kwh: is -3.0; energy used in an interval cannot be negative"

    answer = await api.http.post("/v1/readings", json=body("meter-1", 500))
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Bearer")
    payload = await same_message(
        api, answer, api.grpc(None).SendReading(grpc_request("meter-1", 500))
    )
    assert "Bearer" in payload["message"]
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    answer = await api.http.get("/v1/devices/meter-1/latest", headers=bearer(wrong))
    assert answer.status_code == 401, answer.text
    answer = await api.http.get(
        "/v1/devices/meter-1/latest", headers={"Authorization": "Bearer \u00e9t".encode("latin-1")}
    )
    assert answer.status_code == 401, answer.text

    other = api.tokens["meter-2"]
    answer = await api.http.post("/v1/readings", json=body("meter-1", 500), headers=bearer(other))
    assert answer.status_code == 403
    await same_message(api, answer, api.grpc(other).SendReading(grpc_request("meter-1", 500)))
    answer = await api.http.get("/v1/devices/meter-1/bill", headers=bearer(other))
    assert answer.status_code == 403 and "'meter-1'" in answer.json()["message"]

    answer = await api.http.get("/v1/devices/meter-9/latest", headers=bearer(ADMIN_TOKEN))
    assert answer.status_code == 404
    latest = billing_pb2.GetLatestReadingRequest(device_id="meter-9")
    payload = await same_message(api, answer, api.grpc(ADMIN_TOKEN).GetLatestReading(latest))
    assert "has no readings" in payload["message"]

    answer = await api.http.get(
        "/v1/devices/meter-1/usage",
        params={"start": at(0), "end": at(60), "window": "1h", "time_zone": "Mars/Base"},
        headers=bearer(token),
    )
    assert answer.status_code == 400 and "not an IANA time zone" in answer.json()["message"]


async def test_requests_that_are_not_a_request(api: Api) -> None:
    token = bearer(api.tokens["meter-1"])
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"content": b"{not json"}, 400, "body is not JSON"),
        ({"content": b""}, 400, "empty body"),
        (
            {"json": {"reading": {"device_id": "meter-1", "usage": 1}}},
            400,
            "reading.usage: unknown field",
        ),
        (
            {"json": {"reading": {"device_id": "meter-1", "usage_kwh": "lots"}}},
            400,
            "reading.usage_kwh:",
        ),
        ({"json": {"reading": {"timestamp": "yesterday"}}}, 400, "RFC 3339"),
        (
            {"json": [body("meter-1", 600), {"reading": 5}]},
            400,
            "element 1: reading: expected a JSON object",
        ),
        (
            {
                "content": b'{"reading": {"device_id": "meter-1"}}\n\n{oops\n',
                "headers": {"Content-Type": "application/x-ndjson"},
            },
            400,
            "line 3: not JSON",
        ),
    ]
    for request, status, message in cases:
        headers = {**token, **request.pop("headers", {})}
        answer = await api.http.post("/v1/readings", headers=headers, **request)
        assert answer.status_code == status, (request, answer.text)
        assert message in answer.json()["message"], (request, answer.text)
        assert answer.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]

    answer = await api.http.get(
        "/v1/devices/meter-1/usage", params={"windows": "1h"}, headers=token
    )
    assert answer.status_code == 400 and "'windows' is not a field" in answer.json()["message"]
    assert "window" in answer.json()["message"]
    answer = await api.http.get("/v1/devices/meter-1/nothing", headers=token)
    assert answer.status_code == 404 and "/v1/openapi.json" in answer.json()["message"]
    answer = await api.http.delete("/v1/readings", headers=token)
    assert answer.status_code == 405 and answer.json()["code"] == 12


async def test_a_body_over_the_limit_is_413(api: Api) -> None:
    limit = api.gateway.settings.http_max_body_bytes
    rows = [body("meter-1", 1000 + i) for i in range(limit // 60)]
    payload = json.dumps(rows).encode()
    assert len(payload) > limit
    answer = await api.http.post(
        "/v1/readings",
        content=payload,
        headers={**bearer(api.tokens["meter-1"]), "Content-Type": "application/json"},
    )
    assert answer.status_code == 413
    assert f"larger than {limit} bytes (GATEWAY_HTTP_MAX_BODY_BYTES)" in answer.json()["message"]


async def test_rate_limit_is_429_with_retry_after_and_upstream_down_is_503(
    module_prefix: str, services: tuple[IngestionApp, BillingApp], api: Api
) -> None:
    ingestion, _ = services
    gateway = await start_gateway(
        module_prefix,
        ingestion.port,
        free_port(),  # no billing there
        redis_key_prefix=f"{module_prefix}limited-",  # buckets of its own
        batch_size=1,
        device_burst=1,
        device_rate_per_s=0.01,
        billing_timeout_s=2,
    )
    token = bearer(api.tokens["meter-2"])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as client:
            first = await client.post("/v1/readings", json=body("meter-2", 900), headers=token)
            assert first.status_code == 200, first.text
            second = await client.post("/v1/readings", json=body("meter-2", 915), headers=token)
            assert second.status_code == 429, second.text
            assert 1 <= int(second.headers["Retry-After"]) <= 100
            assert second.json()["message"].startswith("rate limit: device 'meter-2' may send")

            down = await client.get("/v1/devices/meter-2/latest", headers=token)
            assert down.status_code == 503, down.text
            assert down.json()["reason"] == "UPSTREAM_UNAVAILABLE"
            assert down.json()["details"][0]["@type"].endswith("google.rpc.ErrorInfo")
            assert "billing service unreachable" in down.json()["message"]
    finally:
        await gateway.stop()


async def test_reads_over_the_tokens_rate_are_429_with_retry_after(
    module_prefix: str, services: tuple[IngestionApp, BillingApp], api: Api
) -> None:
    ingestion, billing = services
    gateway = await start_gateway(
        module_prefix,
        ingestion.port,
        billing.port,
        redis_key_prefix=f"{module_prefix}reads-",  # buckets of its own
        read_rate_per_s=0.01,  # a token every 100 s: none refills during the test
        read_burst=1,
    )
    token = bearer(api.tokens["meter-2"])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}") as client:
            first = await client.get("/v1/devices/meter-2/bill", headers=token)
            assert first.status_code == 200, first.text
            second = await client.get("/v1/devices/meter-2/latest", headers=token)
            assert second.status_code == 429, second.text
            assert 1 <= int(second.headers["Retry-After"]) <= 100
            assert second.json()["message"].startswith(
                "rate limit: the token of device 'meter-2' may make 0.01 reads/s (burst 1); "
                "retry in "
            )
            for _ in range(2):  # the admin token is not limited
                admin = await client.get("/v1/devices/meter-2/bill", headers=bearer(ADMIN_TOKEN))
                assert admin.status_code == 200, admin.text
    finally:
        await gateway.stop()


async def test_openapi_page_request_id_and_metrics(api: Api) -> None:
    document = await api.http.get("/v1/openapi.json")
    assert document.status_code == 200
    assert document.content == OPENAPI_FILE.read_bytes()
    assert "/v1/devices/{device_id}/usage" in document.json()["paths"]

    page = await api.http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert (await api.http.get("/../pyproject.toml")).status_code == 404
    assert (await api.http.get("/%2e%2e/pyproject.toml")).status_code == 404

    route = "/v1/devices/{device_id}/latest"
    before = http_requests(route, "403")
    answer = await api.http.get(
        "/v1/devices/meter-2/latest",
        headers={**bearer(api.tokens["meter-1"]), "X-Request-Id": "trace-me-42"},
    )
    assert answer.status_code == 403 and answer.headers["x-request-id"] == "trace-me-42"
    assert http_requests(route, "403") == before + 1


def test_the_static_page_ships_with_the_package() -> None:
    assert (Path(OPENAPI_FILE).parent / "static" / "index.html").is_file()
