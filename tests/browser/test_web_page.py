"""The customer web page in headless Chromium against a running stack: an account signs in
with its read-only token, the usage chart and the bill show what the gRPC API answers, a CSV
with bad rows is uploaded and its bad lines listed, and a wrong token shows nothing.

Screenshots: test-artifacts/browser/*.png; UPDATE_DOCS_SCREENSHOT=1 also refreshes
docs/web-page.png (the README's) from the account's page.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from billing_service.adapters.mongo import MongoCatalog
from common.energy.v1 import billing_pb2, gateway_pb2, gateway_pb2_grpc, reading_pb2
from common.gateway_client import gateway_channel
from scripts.import_csv import ParsedRow, RowProblem, parse_rows
from tests.browser.conftest import publish_screenshot, save_screenshot
from tests.conftest import ADMIN_METADATA, ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

pytestmark = pytest.mark.e2e

CATALOG = """
default_tariff: home
tariffs:
  - id: home
    currency: EUR
    time_zone: UTC
    standing_charge_per_day: "0.40"
    tax_rate: "0.20"
    energy: {kind: flat, price_per_kwh: "0.30"}
accounts:
  - {id: household, name: A household}
  - {id: workshop, name: A workshop}
devices:
  - {id: home-meter, account: household, site: house, tariff: home}
  - {id: heat-pump, account: household, site: house, tariff: home}
  - {id: lathe-meter, account: workshop, site: shed, tariff: home}
"""
CHART_ZONE = "Europe/Oslo"
# What the gateway answers for an account until billing has loaded the catalog.
NOT_LOADED_YET = (
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
)
WAIT_S = 30


@dataclass(frozen=True)
class World:
    """The seeded stack: where the page is, the tokens, and the month and day of readings."""

    url: str
    gateway: str
    account_token: str
    device_token: str  # of lathe-meter (workshop), which the CSV upload sends for
    period: str  # last month, YYYY-MM: an estimate (test stacks never close periods)
    day: date  # the day of last month with readings


def readings_of(day: date) -> list[reading_pb2.Reading]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    readings = []
    for i in range(96):  # home-meter: every 15 minutes
        readings.append(
            _reading("home-meter", start + timedelta(minutes=15 * (i + 1)), 0.1 + 0.05 * (i % 12))
        )
    for i in range(24):  # heat-pump: every hour
        readings.append(_reading("heat-pump", start + timedelta(hours=i + 1), 0.8 + 0.1 * (i % 5)))
    return readings


def _reading(device_id: str, at: datetime, kwh: float) -> reading_pb2.Reading:
    message = reading_pb2.Reading(device_id=device_id, usage_kwh=round(kwh, 3))
    message.timestamp.FromDatetime(at)
    return message


@pytest.fixture(scope="module")
async def world(web_stack: Stack) -> World:
    ledger = web_stack.ledger()
    await MongoCatalog(ledger.database).save(CATALOG, "browser test catalog")
    ledger.close()
    today = datetime.now(UTC).date()
    month_start = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    day = month_start + timedelta(days=2)
    readings = readings_of(day)
    async with gateway_channel(web_stack.gateway, ADMIN_TOKEN) as channel:
        admin = gateway_pb2_grpc.DeviceAdminStub(channel)
        gateway = gateway_pb2_grpc.GatewayStub(channel)
        device = await admin.RegisterDevice(
            gateway_pb2.RegisterDeviceRequest(device_id="lathe-meter"), timeout=10
        )
        account_token = ""

        async def issued() -> bool:  # NOT_FOUND until billing has loaded the catalog
            nonlocal account_token
            try:
                answer = await admin.IssueAccountToken(
                    gateway_pb2.IssueAccountTokenRequest(account_id="household"), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() in NOT_LOADED_YET, error
                return False
            account_token = answer.token
            return True

        await wait_until(issued, what="an account token for household")
        requests = (gateway_pb2.SendReadingRequest(reading=r) for r in readings)
        assert (await gateway.SendReadings(requests, timeout=30)).accepted == len(readings)
        expected = sum(Decimal(str(r.usage_kwh)) for r in readings)
        request = billing_pb2.GetAccountBillRequest(
            account_id="household", period=month_start.strftime("%Y-%m")
        )

        async def billed() -> bool:
            answer = await gateway.GetAccountBill(request, timeout=10)
            return sum(Decimal(b.energy_kwh) for b in answer.bills) == expected

        await wait_until(billed, what="household's bill to hold every reading")
    return World(
        url=web_stack.gateway_http,
        gateway=web_stack.gateway,
        account_token=account_token,
        device_token=device.token,
        period=month_start.strftime("%Y-%m"),
        day=day,
    )


# --- the page, as a person uses it ---------------------------------------------------------


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        errors = driver.find_element("id", "error").text
        raise AssertionError(
            f"timed out after {WAIT_S} s waiting for {what}; page error: {errors!r}"
        ) from None


def fresh_page(driver: WebDriver, url: str) -> None:
    """The page at ``url`` as a new tab would have it: nothing in session storage (cleared
    on a path of the same origin that runs no script, so no sign-in from it can write it
    again)."""
    driver.get(url + "/v1/no-page-here")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/")
    wait_for(
        driver,
        lambda d: d.find_element("tag name", "body").get_attribute("data-ready"),
        "the page's script",
    )


def sign_in(driver: WebDriver, kind: str, subject: str, token: str) -> None:
    """By keyboard: the kind's radio, the id, the token, Enter."""
    from selenium.webdriver.common.keys import Keys

    driver.find_element("css selector", f'input[name="kind"][value="{kind}"]').click()
    field = driver.find_element("id", "subject-id")
    field.clear()
    field.send_keys(subject, Keys.TAB)
    assert driver.switch_to.active_element == driver.find_element("id", "token")
    driver.switch_to.active_element.send_keys(token, Keys.ENTER)


def set_value(driver: WebDriver, element_id: str, value: str) -> None:
    """Date and month inputs: their value set as a picker would, with the change event."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id,
        value,
    )


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element("id", element_id).is_displayed())


def bars(driver: WebDriver) -> list[WebElement]:
    return driver.find_elements("css selector", "#usage-chart rect.bar")


def chart_fits(driver: WebDriver) -> bool:
    """The chart drawn for its present width (it redraws on resize), with its bars."""
    return bool(
        driver.execute_script(
            "const chart = document.getElementById('usage-chart');"
            "const width = Math.max(300, Math.round(chart.getBoundingClientRect().width));"
            "return Math.abs(chart.viewBox.baseVal.width - width) < 2"
            " && chart.querySelectorAll('rect.bar').length > 0"
        )
    )


def storage(driver: WebDriver) -> dict[str, Any]:
    return driver.execute_script(
        "return {session: sessionStorage.getItem('energy.session'), local: localStorage.length,"
        " cookies: document.cookie}"
    )


@pytest.fixture
def grpc_gateway(world: World) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    """A real gRPC client of the same gateway, with the admin token."""
    with grpc.insecure_channel(world.gateway) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


# --- the tests -----------------------------------------------------------------------------


def test_account_token_shows_the_chart_and_the_bill_the_grpc_api_answers(
    chrome: WebDriver, world: World, grpc_gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    from selenium.webdriver.support.ui import Select

    fresh_page(chrome, world.url)
    sign_in(chrome, "account", "household", world.account_token)
    wait_for(chrome, lambda d: visible(d, "dashboard"), "the dashboard")
    kept = storage(chrome)
    assert world.account_token in (kept["session"] or "")
    assert (kept["local"], kept["cookies"]) == (0, ""), "the token must stay in sessionStorage"

    set_value(chrome, "bill-period", world.period)
    chrome.find_element("id", "bill-show").click()
    bill = grpc_gateway.GetAccountBill(
        billing_pb2.GetAccountBillRequest(account_id="household", period=world.period),
        metadata=ADMIN_METADATA,
        timeout=10,
    )
    total = chrome.find_element("id", "bill-total")
    wait_for(chrome, lambda d: total.get_attribute("data-amount") == bill.total, "the bill total")
    assert total.text == f"{bill.total} {bill.currency}"
    assert chrome.find_element("id", "bill-status").text.lower() == "estimate"
    rows = chrome.find_elements("css selector", "#account-devices tbody tr")
    shown = {row.find_elements("tag name", "td")[0].text: row for row in rows}
    assert set(shown) == {b.device_id for b in bill.bills} == {"home-meter", "heat-pump"}
    shares = [float(row.find_element("css selector", "td.share").text.split()[0]) for row in rows]
    assert sum(shares) == pytest.approx(100, abs=0.2)

    # The usage chart: a local day in another zone than the browser's, hourly windows.
    Select(chrome.find_element("id", "device-select")).select_by_value("home-meter")
    Select(chrome.find_element("id", "usage-range")).select_by_value("day")
    Select(chrome.find_element("id", "usage-window")).select_by_value("1h")
    Select(chrome.find_element("id", "usage-zone")).select_by_value(CHART_ZONE)
    set_value(chrome, "usage-date", world.day.isoformat())
    chrome.find_element("id", "usage-show").click()
    wait_for(chrome, lambda d: len(bars(d)) == 24, "24 hourly bars")
    zone = ZoneInfo(CHART_ZONE)
    start = datetime(world.day.year, world.day.month, world.day.day, tzinfo=zone)
    usage = billing_pb2.GetUsageRequest(device_id="home-meter", window="1h", time_zone=CHART_ZONE)
    usage.start.CopyFrom(_timestamp(start))
    usage.end.CopyFrom(_timestamp(start + timedelta(days=1)))
    buckets = grpc_gateway.GetUsage(usage, metadata=ADMIN_METADATA, timeout=10).buckets
    drawn = bars(chrome)
    assert [float(bar.get_attribute("data-kwh")) for bar in drawn] == pytest.approx(
        [b.sum_kwh for b in buckets]
    )
    heights = [float(bar.get_attribute("height")) for bar in drawn]
    assert sum(h > 0 for h in heights) >= 20, heights  # points drawn, not an empty frame
    assert visible(chrome, "upload-readonly") and not visible(chrome, "upload-form")
    publish_screenshot(save_screenshot(chrome, "account-desktop"))

    # Phone width: one column, nothing wider than the screen.
    size = chrome.get_window_size()
    chrome.set_window_size(390, 844)
    try:
        wait_for(chrome, chart_fits, "the chart redrawn at phone width")
        overflow = chrome.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px wider than a phone's screen"
        save_screenshot(chrome, "account-phone")
    finally:
        chrome.set_window_size(size["width"], size["height"])


def _timestamp(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at.astimezone(UTC))
    return stamp


def upload_csv(day: date) -> str:
    d = day.isoformat()
    return (
        "device_id,timestamp,usage_kwh\n"  # 1
        f"lathe-meter,{d} 10:00:00,0.5\n"  # 2: Oslo local time
        f"lathe-meter,{d}T10:15:00Z,0.25\n"  # 3
        "lathe-meter,not-a-time,0.3\n"  # 4: bad timestamp
        "\n"  # 5: blank, skipped
        f"lathe-meter,{d}T10:30:00Z\n"  # 6: two columns
        f'"lathe-meter","{d}T10:45:00Z","1.5"\n'  # 7
        f"lathe-meter,{d}T11:00:00Z,-3\n"  # 8: the gateway refuses a negative usage
        f"lathe-meter,{d}T11:15:00Z,lots\n"  # 9: not a number
        f'"lathe\nmeter",{d}T11:30:00Z,0.1\n'  # 10-11: the gateway refuses the id
        f"lathe-meter,{d}T11:45:00Z,0.75\n"  # 12
    )


def test_csv_upload_lists_bad_rows_by_line_and_sends_the_good_ones(
    chrome: WebDriver,
    world: World,
    grpc_gateway: gateway_pb2_grpc.GatewayStub,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.support.ui import Select

    day = world.day + timedelta(days=2)
    text = upload_csv(day)
    path = tmp_path / "readings.csv"
    path.write_text(text)
    local = [
        item
        for item in parse_rows(io.StringIO(text, newline=""), zone=ZoneInfo(CHART_ZONE))
        if isinstance(item, RowProblem)
    ]
    assert [p.line for p in local] == [4, 6, 9]

    fresh_page(chrome, world.url)
    sign_in(chrome, "device", "lathe-meter", world.device_token)
    wait_for(chrome, lambda d: visible(d, "dashboard"), "the dashboard")
    chrome.refresh()  # the tab keeps its session: signed in again from sessionStorage
    wait_for(chrome, lambda d: visible(d, "dashboard"), "the dashboard after a reload")
    Select(chrome.find_element("id", "upload-zone")).select_by_value(CHART_ZONE)
    chrome.find_element("id", "upload-file").send_keys(str(path))
    chrome.find_element("id", "upload-button").click()
    wait_for(chrome, lambda d: visible(d, "upload-report"), "the upload report")

    progress = chrome.find_element("id", "upload-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max")
    problems = [li.text for li in chrome.find_elements("css selector", "#upload-problems li")]
    by_line = {int(p.split(":")[0].removeprefix("line ")): p for p in problems}
    assert sorted(by_line) == [4, 6, 8, 9, 10], problems
    for problem in local:  # the same reasons as make import
        assert by_line[problem.line] == f"line {problem.line}: {problem.reason}"
    assert "gateway: usage_kwh" in by_line[8]
    assert "gateway: device_id" in by_line[10]
    summary = chrome.find_element("id", "upload-summary").text
    assert "accepted: 4, rejected: 5 (3 in the file, 2 by the gateway)" in summary
    save_screenshot(chrome, "device-upload")

    # The good rows reached billing: the latest is line 12's.
    expected = datetime(day.year, day.month, day.day, 11, 45, tzinfo=UTC)
    request = billing_pb2.GetLatestReadingRequest(device_id="lathe-meter")
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            latest = grpc_gateway.GetLatestReading(request, metadata=ADMIN_METADATA, timeout=10)
            if latest.reading.timestamp.ToDatetime(tzinfo=UTC) == expected:
                break
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the uploaded readings did not reach billing"
        time.sleep(0.2)


def test_a_wrong_token_shows_an_error_and_no_data(chrome: WebDriver, world: World) -> None:
    fresh_page(chrome, world.url)
    sign_in(chrome, "account", "household", "et1.0123456789abcdef.not-the-secret")
    wait_for(chrome, lambda d: visible(d, "error"), "the error")
    message = chrome.find_element("id", "error").text
    assert "refused the token (401)" in message, message
    assert not visible(chrome, "dashboard")
    assert chrome.find_element("id", "bill-total").get_attribute("textContent") == ""
    assert chrome.find_elements("css selector", "#account-devices tbody tr") == []
    assert bars(chrome) == []
    assert storage(chrome)["session"] is None
    assert chrome.switch_to.active_element == chrome.find_element("id", "token")
    save_screenshot(chrome, "wrong-token")


# The page's CSV parser (csv.js) against scripts.import_csv.parse_rows, row by row.
TRICKY_CSV = (
    "Device_ID , timestamp,usage_kwh\r\n"
    "m1,2024-10-27 02:30:00,1\r\n"  # the clocks go back: first the earlier instant
    "m1,2024-10-27 02:30:00,1\r\n"  # then the later one
    "m2,2024-10-27 02:30:00,1\r\n"  # another device: its own first
    "m1,2024-03-31 02:30:00,1\r\n"  # skipped by the clocks: bad
    "m1,2024-05-01T12:00:00Z,1e-3\r\n"
    "m1,2024-05-01T12:00:00.250+02:00,.5\n"
    "m1,2024-05-01 12:00,+2\n"
    "m1,2024-05-01,1\n"
    "m1,,1\n"
    "m1,2024-05-01T12:00:00Z,1_0\n"
    "m1,2024-05-01T12:00:00Z,nan\n"
    "m1,2024-05-01T12:00:00Z,-inf\n"
    "m1,2024-05-01T12:00:00Z, 7 \n"
    "m1,2024-13-01T12:00:00Z,1\n"
    "m1,2024-02-30 12:00:00,1\n"
    'm1,"it\'s 12:00",1\n'
    '"m,3",2024-05-01T12:00:00Z,1\n'
    '"multi\r\nline",2024-05-01T12:00:00Z,1\n'
    "\n"
    "a,b\n"
    "a,b,c,d\n"
    " m1 ,2024-05-01T12:00:00Z,1\n"
    "m1,2024-05-01T25:00:00Z,1\n"
    "m1,2024-05-01T12:00:00+0530,1\n"
    "m1, 2024-05-01 12:00:00 ,1\n"
    'm1,2024-05-01T12:00:00Z,"1"5\n'
    "m1,2024-05-01T12:00:00Z,x"
)


def _python_rows(text: str, zone: str, device: str | None) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for item in parse_rows(io.StringIO(text, newline=""), device, ZoneInfo(zone)):
        if isinstance(item, ParsedRow):
            rows.append((item.line, item.device_id, item.timestamp, _usage(item.usage_kwh)))
        else:
            rows.append((item.line, item.reason))
    return rows


def _usage(value: float | str) -> str:
    number = float(value)  # the page sends NaN and infinities as protobuf JSON strings
    return "nan" if math.isnan(number) else repr(number)


@pytest.mark.parametrize(
    ("text", "zone", "device"),
    [
        (TRICKY_CSV, "Europe/Oslo", None),
        (TRICKY_CSV.replace("\r\n", "\n"), "America/New_York", None),
        ("time,meterusage\n2024-05-01 12:00:00,1\n2024-05-01 12:15,x\n", "UTC", "meter-7"),
    ],
)
def test_the_pages_csv_rules_are_make_imports(
    chrome: WebDriver, world: World, text: str, zone: str, device: str | None
) -> None:
    chrome.get(world.url + "/")
    wait_for(
        chrome, lambda d: d.find_element("tag name", "body").get_attribute("data-ready"), "the page"
    )
    page = chrome.execute_script(
        "return EnergyCsv.parseCsv(arguments[0], {zone: arguments[1], device: arguments[2]}).rows",
        text,
        zone,
        device or "",
    )
    rows: list[tuple[Any, ...]] = []
    for row in page:
        if "reason" in row:
            rows.append((row["line"], row["reason"]))
        else:
            reading = row["reading"]
            stamp = datetime.fromisoformat(reading["timestamp"].replace("Z", "+00:00"))
            rows.append((row["line"], reading["device_id"], stamp, _usage(reading["usage_kwh"])))
    assert rows == _python_rows(text, zone, device)


def test_the_pages_csv_header_errors_are_make_imports(chrome: WebDriver, world: World) -> None:
    chrome.get(world.url + "/")
    wait_for(
        chrome, lambda d: d.find_element("tag name", "body").get_attribute("data-ready"), "the page"
    )
    parse = (
        "try { EnergyCsv.parseCsv(arguments[0], {zone: arguments[1], device: arguments[2]});"
        " return null } catch (e) { return e.message }"
    )
    assert chrome.execute_script(parse, "", "UTC", "").startswith(
        "unknown CSV header: found 'nothing (empty file)'"
    )
    assert chrome.execute_script(parse, "id,when,kwh\n", "UTC", "").startswith(
        "unknown CSV header: found 'id,when,kwh'"
    )
    assert "needs a device id" in chrome.execute_script(parse, "time,meterusage\n", "UTC", "")
    assert "unknown time zone 'Mars/Olympus'" in chrome.execute_script(
        parse, "device_id,timestamp,usage_kwh\n", "Mars/Olympus", ""
    )
