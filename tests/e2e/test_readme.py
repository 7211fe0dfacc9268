"""The README's grpcurl and curl examples, run with the real tools against a running stack.

Each ```sh block that calls grpcurl or curl (or pipes into curl) is followed by a ```text
block with what it prints; the command's output (stdout and stderr) must be exactly that.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import grpc
import pytest

from analytics_service.settings import AnalyticsSettings
from api_gateway.settings import GatewaySettings
from billing_service.adapters.mongo import MongoCatalog
from billing_service.settings import BillingSettings
from common.energy.v1 import billing_pb2, billing_pb2_grpc
from common.settings import env_names
from ingestion_service.settings import IngestionSettings
from tests.conftest import ADMIN_TOKEN, wait_until
from tests.e2e.conftest import Stack

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
SAMPLE_CATALOG = ROOT / "deployments" / "tariffs.yaml"
# grpcurl and curl calls, and `make close-period`, run as the Python command it runs (its
# output is the command's, without make's echo of the recipe).
EXAMPLES = re.findall(
    r"```sh\n((?:grpcurl|curl|printf|make close-period) .*?)```\n```text\n(.*?)```",
    README,
    flags=re.S,
)
CLOSE_PERIOD = re.compile(r"make close-period PERIOD=(\S+) ACCOUNT=(\S+)")


def grpcurl_path() -> str:
    found = shutil.which("grpcurl") or os.path.expanduser("~/go/bin/grpcurl")
    assert os.access(found, os.X_OK), "grpcurl is missing: run `make services`"
    return found


READS = ("GetLatestReading", "GetDeviceBill", "GetUsage", "ListReadings", "localhost:8080/v1/")


def test_the_readme_has_the_examples() -> None:
    commands = " ".join(command for command, _ in EXAMPLES)
    assert len(EXAMPLES) == 33
    assert all(
        name in commands
        for name in (
            "list",
            "RegisterDevice",
            "/SendReading\n",
            "/SendReadings",
            '{"readings": [',
            "Health",
            "make close-period",
            "IssueAccountToken",
            "/v1/readings",
            "application/x-ndjson",
            "/latest",
            "/usage",
            "/readings?",
            "/bill?",
            "/bills?",
            "/v1/openapi.json",
            *READS,
        )
    )


# What the README shows in place of a generated token's parts.
TOKEN_PLACEHOLDERS = {
    "<key id>": "[0-9a-f]{16}",
    "<secret>": "[A-Za-z0-9_-]{43}",
    "<issued at>": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z",
}


def expected_pattern(expected: str) -> re.Pattern[str]:
    pattern = re.escape(expected.strip())
    for placeholder, part in TOKEN_PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(placeholder), part)
    return re.compile(pattern)


def grpcurl_exit_code(expected: str) -> int:
    """grpcurl exits 64 + the status code on an error status, 0 on OK."""
    code = re.search(r"Code: (\w+)", expected)
    if code is None:
        return 0
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", code.group(1)).upper()
    return 64 + grpc.StatusCode[name].value[0]


@pytest.fixture(scope="module")
async def seeded(stack: Stack) -> Stack:
    """The README's stack with the sample tariffs that `make dev` loads."""
    ledger = stack.ledger()
    await MongoCatalog(ledger.database).save(SAMPLE_CATALOG.read_text(), str(SAMPLE_CATALOG))
    ledger.close()
    await wait_until(lambda: catalog_loaded(stack), what="billing loading the sample catalog")
    return stack


async def catalog_loaded(stack: Stack) -> bool:
    """Billing holds the sample catalog (its account acct-1003 exists)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['BILLING_PORT']}") as channel:
        try:
            await billing_pb2_grpc.BillingStub(channel).GetAccount(
                billing_pb2.GetAccountRequest(account_id="acct-1003"), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                return False
            raise
    return True


async def billed(stack: Stack, count: int) -> bool:
    """Billing has taken ``count`` readings: billed, or found to be ones it held already."""
    taken = 0.0
    for result in ("billed", "duplicate"):
        taken += await stack.metric("BILLING", "billing_readings_total", {"result": result})
    return taken >= count


async def test_the_readme_examples_print_what_the_readme_says_in_order(
    seeded: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """One test, not one per example: the README is a walk-through (a device registered by
    one example sends with its token in the next), so its order is part of it, whatever
    order the suite runs in."""
    issued: dict[str, str] = {}
    accepted = 0  # readings the examples sent so far: a read waits until billing has them
    for number, (command, expected) in enumerate(EXAMPLES, start=1):
        text, returncode = await run_example(seeded, command, issued, accepted, tmp_path_factory)
        where = f"README example {number} ({command.splitlines()[0][:60]})"
        assert expected_pattern(expected).fullmatch(text), f"{where}:\n{text}\n!=\n{expected}"
        assert returncode == grpcurl_exit_code(expected), where
        if "RegisterDevice" in command:
            issued["token"] = json.loads(text)["token"]
        if "IssueAccountToken" in command:
            issued["account_token"] = json.loads(text)["token"]
        accepted += readings_accepted(command, text, returncode)


def readings_accepted(command: str, output: str, returncode: int | None) -> int:
    """How many readings an example had accepted: one for a reading id, a stream's count."""
    sends = command.rstrip().endswith("/SendReading") or "/SendReadings" in command
    if returncode != 0 or not (sends or "/v1/readings" in command):
        return 0
    answer = json.loads(output)
    return int(answer["accepted"]) if "accepted" in answer else int("reading_id" in answer)


async def run_example(
    stack: Stack,
    command: str,
    issued: dict[str, str],
    accepted: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, int | None]:
    """Run one README command against the stack as a shell would; its output and exit code."""
    if any(read in command for read in READS) or CLOSE_PERIOD.match(command):
        # Reads and closes follow accepted readings; let billing catch up first.
        await wait_until(lambda: billed(stack, accepted), what="the README's readings billed")
    close = CLOSE_PERIOD.fullmatch(command.strip())
    if close:
        period, account = close.groups()
        python = f"{sys.executable} -m billing_service.close_period {period} --account {account}"
        process = await asyncio.create_subprocess_exec(
            *python.split(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=ROOT,
            env=stack.env(),
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
        return output.decode().strip(), process.returncode
    command = (
        command.replace("localhost:50051", stack.gateway)
        .replace("localhost:8080", stack.gateway_http.removeprefix("http://"))
        .replace("grpcurl ", f"{grpcurl_path()} ", 1)
    )
    if "$TOKEN" in command:
        assert "token" in issued, "the RegisterDevice example runs first and prints the token"
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".admin-token").write_text(ADMIN_TOKEN + "\n")  # as `make dev` writes it
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=folder,
        env={
            **os.environ,
            "TOKEN": issued.get("token", ""),
            "ACCOUNT_TOKEN": issued.get("account_token", ""),
        },
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    return output.decode().strip(), process.returncode


def test_the_readme_documents_every_setting() -> None:
    for settings_class in (GatewaySettings, IngestionSettings, BillingSettings, AnalyticsSettings):
        for variable in env_names(settings_class):
            if variable.endswith("_HOST"):
                assert "`*_HOST`" in README
            else:
                assert f"`{variable}" in README or f"{variable}`" in README, variable
