"""Read-only account tokens against real RabbitMQ, Redis, SecantusDB and a billing service.

An account token reads the devices billing's catalog bills to its account and the
account's bills; it sends nothing and reads no other account. The gateway asks billing
which account a device belongs to (``GetDeviceAccount``), and billing's catalog whether an
account exists before a token is issued for it (``GetAccount``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import grpc
import pytest
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient

from billing_service.adapters.mongo import MongoCatalog
from billing_service.app import BillingApp
from common.energy.v1 import billing_pb2, gateway_pb2
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.component.test_auth import Gateway, refused, start_gateway
from tests.component.test_billing import cleanup, settings
from tests.component.test_ingestion import T, request
from tests.conftest import ADMIN_TOKEN, MONGODB_URL, wait_until

Code = grpc.StatusCode
CATALOG = """
default_tariff: flat
tariffs:
  - id: flat
    currency: EUR
    time_zone: Europe/Berlin
    standing_charge_per_day: "0.45"
    energy: {kind: flat, price_per_kwh: "0.30"}
accounts:
  - {id: acme, name: ACME}
  - {id: globex, name: Globex}
  - {id: initech, name: Initech}
devices:
  - {id: meter-1, account: acme, site: plant, tariff: flat}
  - {id: meter-2, account: acme, site: office, tariff: flat}
  - {id: meter-9, account: globex, site: hq, tariff: flat}
"""


@dataclass
class Stack:
    gateway: Gateway
    billing: BillingApp

    async def issue(self, account_id: str) -> str:
        answer = await self.gateway.admin().IssueAccountToken(
            gateway_pb2.IssueAccountTokenRequest(account_id=account_id), timeout=10
        )
        assert answer.account_id == account_id
        return answer.token


@pytest.fixture
def gateway_overrides() -> dict[str, object]:
    """Settings of the stack's gateway beyond the defaults (a test parametrizes it)."""
    return {}


@pytest.fixture
async def stack(prefix: str, gateway_overrides: dict[str, object]) -> AsyncIterator[Stack]:
    """Billing (with the catalog above), ingestion and a gateway that asks that billing."""
    # MongoDB's 5 s, not the 1 s of billing's own tests: this stack shares a busy machine.
    billing = BillingApp(settings(prefix).model_copy(update={"mongodb_timeout_s": 5}))
    await MongoCatalog(billing.ledger.database).save(CATALOG, "test catalog")
    await billing.start()
    ingestion = IngestionApp(IngestionSettings(port=0, topology_prefix=prefix, confirm_timeout_s=5))
    await ingestion.start()
    await ingestion.publisher._connecting
    app = await start_gateway(
        prefix, ingestion.port, billing_addr=f"127.0.0.1:{billing.port}", **gateway_overrides
    )
    yield Stack(Gateway(prefix, app.port, app), billing)
    await app.stop()
    await ingestion.stop()
    await billing.stop()
    await cleanup(prefix, billing)  # the database (credentials too), Redis keys, topology


def refusals(code: str, token: str) -> float:
    labels = {"code": code, "token": token}
    return REGISTRY.get_sample_value("gateway_auth_failures_total", labels) or 0.0


def accepted() -> float:
    return REGISTRY.get_sample_value("gateway_readings_accepted_total") or 0.0


def reads_limited() -> float:
    labels = {"scope": "reads"}
    return REGISTRY.get_sample_value("gateway_ratelimited_readings_total", labels) or 0.0


async def test_an_account_token_reads_its_account_and_its_devices_only(stack: Stack) -> None:
    gateway = stack.gateway
    device_token = await gateway.register("meter-1")
    await gateway.stub(device_token).SendReading(request("meter-1"), timeout=10)
    latest = billing_pb2.GetLatestReadingRequest(device_id="meter-1")

    async def billed() -> bool:
        try:
            await gateway.stub(ADMIN_TOKEN).GetLatestReading(latest, timeout=10)
        except grpc.aio.AioRpcError as error:
            assert error.code() == Code.NOT_FOUND, error.details()
            return False
        return True

    await wait_until(billed, what="billing to hold meter-1's reading")

    token = await stack.issue("acme")
    assert token.startswith("et1.")
    acme = gateway.stub(token)

    # Every device of the account, every read.
    answer = await acme.GetLatestReading(latest, timeout=10)
    assert answer.reading.device_id == "meter-1" and answer.reading.usage_kwh == 1.5
    usage = billing_pb2.GetUsageRequest(device_id="meter-1", window="1d")
    usage.start.FromDatetime(T.replace(hour=0, minute=0, second=0))
    usage.end.FromDatetime(T.replace(hour=0, minute=0, second=0) + timedelta(days=1))
    assert sum(b.count for b in (await acme.GetUsage(usage, timeout=10)).buckets) == 1
    page = await acme.ListReadings(billing_pb2.ListReadingsRequest(device_id="meter-1"))
    assert [r.device_id for r in page.readings] == ["meter-1"]
    bill = await acme.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="meter-2"))
    assert bill.bill.device_id == "meter-2"

    # The account's own bills; its devices and their share are the account bill's lines.
    account = await acme.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="acme"))
    assert sorted(b.device_id for b in account.bills) == ["meter-1", "meter-2"]
    issued = await acme.ListBills(billing_pb2.ListBillsRequest(account_id="acme"), timeout=10)
    assert list(issued.bills) == []  # no period has closed yet

    # Nothing of another account, nor a device the catalog bills to no account.
    denied_before = refusals("PERMISSION_DENIED", "account")
    for device in ("meter-9", "stray-7"):
        details = await refused(
            acme.GetLatestReading(billing_pb2.GetLatestReadingRequest(device_id=device)),
            Code.PERMISSION_DENIED,
        )
        assert details == (
            "the token of account 'acme' may read only account 'acme' (its bill, its issued "
            f"bills) and the devices billed to it; device {device!r} is not one of them"
        )
    await refused(
        acme.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="meter-9")),
        Code.PERMISSION_DENIED,
    )
    details = await refused(
        acme.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="globex")),
        Code.PERMISSION_DENIED,
    )
    assert "may read only account 'acme'" in details and "not account 'globex'" in details
    await refused(
        acme.ListBills(billing_pb2.ListBillsRequest(account_id="globex")), Code.PERMISSION_DENIED
    )
    assert refusals("PERMISSION_DENIED", "account") == denied_before + 5

    # Read-only: no reading is sent, by either call, whatever it carries.
    sent_before = accepted()
    details = await refused(acme.SendReading(request("meter-1", 1)), Code.PERMISSION_DENIED)
    assert details == (
        "account tokens are read-only: the token of account 'acme' may not send readings; "
        "send them with the device's own token"
    )
    details = await refused(
        acme.SendReadings(iter([request("meter-1", 2), request("meter-1", 3, kwh=-1)])),
        Code.PERMISSION_DENIED,
    )
    assert details.startswith("account tokens are read-only")
    assert accepted() == sent_before

    # Nor does it administer tokens; and a device token still reads no account bill.
    await refused(
        gateway.admin(token).IssueAccountToken(
            gateway_pb2.IssueAccountTokenRequest(account_id="acme")
        ),
        Code.PERMISSION_DENIED,
    )
    details = await refused(
        gateway.stub(device_token).GetAccountBill(
            billing_pb2.GetAccountBillRequest(account_id="acme")
        ),
        Code.PERMISSION_DENIED,
    )
    assert "account's own token" in details


async def test_account_tokens_are_issued_for_catalog_accounts_stored_hashed_and_revocable(
    stack: Stack, prefix: str
) -> None:
    gateway = stack.gateway
    admin = gateway.admin()
    details = await refused(
        admin.IssueAccountToken(gateway_pb2.IssueAccountTokenRequest(account_id="hooli")),
        Code.NOT_FOUND,
    )
    assert details == (
        "account 'hooli' is not in billing's tariff catalog; add it to the catalog and load "
        "it with `make seed`"
    )
    await refused(
        admin.IssueAccountToken(gateway_pb2.IssueAccountTokenRequest(account_id="bad id")),
        Code.INVALID_ARGUMENT,
    )
    await refused(
        admin.RotateAccountToken(gateway_pb2.RotateAccountTokenRequest(account_id="initech")),
        Code.NOT_FOUND,  # no token yet: "use IssueAccountToken"
    )

    # An account with no devices yet may have a token; a device of the same id is apart.
    token = await stack.issue("initech")
    device_token = await gateway.register("initech")
    details = await refused(
        admin.IssueAccountToken(gateway_pb2.IssueAccountTokenRequest(account_id="initech")),
        Code.ALREADY_EXISTS,
    )
    assert "use RotateAccountToken" in details

    # Stored: the hash of the secret, the kind and the account; never the token.
    mongo = AsyncMongoClient(MONGODB_URL, serverSelectionTimeoutMS=5000)
    try:
        stored = await mongo[prefix.strip("-")]["device_credentials"].find_one(
            {"_id": "account/initech"}
        )
    finally:
        await mongo.close()
    assert stored is not None
    _, key_id, secret = token.split(".")
    assert (stored["kind"], stored["account_id"], stored["key_id"]) == (
        "account",
        "initech",
        key_id,
    )
    assert stored["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert not [value for value in stored.values() if secret in str(value)]

    # Reads its bill (NOT_FOUND from billing: the account has no devices), then is rotated
    # and revoked like a device token.
    bill = billing_pb2.GetAccountBillRequest(account_id="initech")
    await refused(gateway.stub(token).GetAccountBill(bill), Code.NOT_FOUND)
    rotated = await admin.RotateAccountToken(
        gateway_pb2.RotateAccountTokenRequest(account_id="initech"), timeout=10
    )
    assert rotated.token != token
    await refused(gateway.stub(token).GetAccountBill(bill), Code.UNAUTHENTICATED)
    await refused(gateway.stub(rotated.token).GetAccountBill(bill), Code.NOT_FOUND)
    await admin.RevokeAccountToken(
        gateway_pb2.RevokeAccountTokenRequest(account_id="initech"), timeout=10
    )
    details = await refused(gateway.stub(rotated.token).GetAccountBill(bill), Code.UNAUTHENTICATED)
    assert details == (
        "the token of account 'initech' was revoked; ask the operator for a new one "
        "(DeviceAdmin/RotateAccountToken)"
    )
    # The device of the same id kept its own token.
    await gateway.stub(device_token).SendReading(request("initech"), timeout=10)


# A token every 100 s: nothing refills while the test runs.
@pytest.mark.parametrize("gateway_overrides", [{"read_rate_per_s": 0.01, "read_burst": 3}])
async def test_reads_are_limited_per_token_and_not_for_the_admin(stack: Stack) -> None:
    gateway = stack.gateway
    acme = gateway.stub(await stack.issue("acme"))
    bill = billing_pb2.GetAccountBillRequest(account_id="acme")
    other_device = billing_pb2.GetLatestReadingRequest(device_id="meter-9")
    limited_before = reads_limited()

    # A read the rule refuses takes no token, so the burst is still three reads, of any kind.
    await refused(acme.GetLatestReading(other_device), Code.PERMISSION_DENIED)
    await acme.GetAccountBill(bill, timeout=10)
    await acme.ListBills(billing_pb2.ListBillsRequest(account_id="acme"), timeout=10)
    await acme.GetDeviceBill(billing_pb2.GetDeviceBillRequest(device_id="meter-2"), timeout=10)
    call = acme.GetAccountBill(bill, timeout=10)
    details = await refused(call, Code.RESOURCE_EXHAUSTED)
    assert details.startswith(
        "rate limit: the token of account 'acme' may make 0.01 reads/s (burst 3); retry in "
    )
    trailers = dict(await call.trailing_metadata())
    assert 0 < int(trailers["grpc-retry-pushback-ms"]) <= 100_000
    # Who may read is still decided first.
    await refused(acme.GetLatestReading(other_device), Code.PERMISSION_DENIED)

    # meter-1 is billed to acme, but its device token has a bucket of its own.
    meter_1 = gateway.stub(await gateway.register("meter-1"))
    own_bill = billing_pb2.GetDeviceBillRequest(device_id="meter-1")
    for _ in range(3):
        await meter_1.GetDeviceBill(own_bill, timeout=10)
    call = meter_1.GetDeviceBill(own_bill, timeout=10)
    details = await refused(call, Code.RESOURCE_EXHAUSTED)
    assert details.startswith(
        "rate limit: the token of device 'meter-1' may make 0.01 reads/s (burst 3); retry in "
    )
    assert 0 < int(dict(await call.trailing_metadata())["grpc-retry-pushback-ms"]) <= 100_000
    await meter_1.SendReading(request("meter-1"), timeout=10)  # sending is not reading

    # So has another account's token.
    globex = gateway.stub(await stack.issue("globex"))
    await globex.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="globex"), timeout=10)

    # The admin token (reconcile and other bulk tools) is not limited.
    admin = gateway.stub(ADMIN_TOKEN)
    for _ in range(5):
        await admin.GetAccountBill(bill, timeout=10)
    assert reads_limited() == limited_before + 2


@pytest.mark.parametrize(
    "gateway_overrides",
    [
        {
            "read_rate_per_s": 0.01,
            "read_burst": 10,
            "global_read_rate_per_s": 0.01,
            "global_read_burst": 4,
        }
    ],
)
async def test_all_tokens_together_are_limited_by_the_gateways_read_bucket(stack: Stack) -> None:
    gateway = stack.gateway
    acme = gateway.stub(await stack.issue("acme"))
    meter_1 = gateway.stub(await gateway.register("meter-1"))
    globex = gateway.stub(await stack.issue("globex"))
    before = REGISTRY.get_sample_value(
        "gateway_ratelimited_readings_total", {"scope": "global_reads"}
    )

    acme_bill = billing_pb2.GetAccountBillRequest(account_id="acme")
    meter_bill = billing_pb2.GetDeviceBillRequest(device_id="meter-1")
    for _ in range(2):  # each token far within its own burst of 10
        await acme.GetAccountBill(acme_bill, timeout=10)
        await meter_1.GetDeviceBill(meter_bill, timeout=10)
    call = globex.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="globex"), timeout=10)
    details = await refused(call, Code.RESOURCE_EXHAUSTED)
    assert details.startswith(
        "rate limit: the gateway answers 0.01 reads/s from all device and account tokens "
        "together (burst 4); retry in "
    )
    assert 0 < int(dict(await call.trailing_metadata())["grpc-retry-pushback-ms"]) <= 100_000
    after = REGISTRY.get_sample_value(
        "gateway_ratelimited_readings_total", {"scope": "global_reads"}
    )
    assert after - (before or 0) == 1
    # The admin token (reconcile and other bulk tools) is not limited by it either.
    admin = gateway.stub(ADMIN_TOKEN)
    await admin.GetAccountBill(billing_pb2.GetAccountBillRequest(account_id="globex"), timeout=10)
