"""The README's grpcurl examples, run with the real grpcurl against a running gateway.

Each ```sh block that calls grpcurl is followed by a ```text block with what it prints;
the command's output (stdout and stderr) must be exactly that.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from analytics_service.settings import AnalyticsSettings
from api_gateway.settings import GatewaySettings
from billing_service.adapters.mongo import MongoCatalog
from billing_service.settings import BillingSettings
from common.settings import env_names
from ingestion_service.settings import IngestionSettings
from tests.conftest import wait_until
from tests.e2e.conftest import Stack

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text()
SAMPLE_CATALOG = ROOT / "deployments" / "tariffs.yaml"
EXAMPLES = re.findall(r"```sh\n(grpcurl .*?)```\n```text\n(.*?)```", README, flags=re.S)


def grpcurl_path() -> str:
    found = shutil.which("grpcurl") or os.path.expanduser("~/go/bin/grpcurl")
    assert os.access(found, os.X_OK), "grpcurl is missing: run `make services`"
    return found


READS = ("GetLatestReading", "GetDeviceBill", "GetUsage", "ListReadings")


def test_the_readme_has_the_examples() -> None:
    commands = " ".join(command for command, _ in EXAMPLES)
    assert len(EXAMPLES) == 9
    assert all(
        name in commands for name in ("list", "/SendReading\n", "/SendReadings", "Health", *READS)
    )


@pytest.fixture(scope="module")
async def seeded(stack: Stack) -> Stack:
    """The README's stack with the sample tariffs that `make dev` loads."""
    ledger = stack.ledger()
    await MongoCatalog(ledger.database).save(SAMPLE_CATALOG.read_text(), str(SAMPLE_CATALOG))
    ledger.close()
    return stack


async def billed(stack: Stack, count: int) -> bool:
    return await stack.metric("BILLING", "billing_readings_total", {"result": "billed"}) >= count


@pytest.mark.parametrize(("command", "expected"), EXAMPLES, ids=lambda v: v.split("\n")[0][-40:])
async def test_a_readme_example_prints_what_the_readme_says(
    seeded: Stack, command: str, expected: str
) -> None:
    stack = seeded
    if any(read in command for read in READS):
        # The read examples follow three accepted readings; let billing catch up first.
        await wait_until(lambda: billed(stack, 3), what="the README's readings billed")
        await asyncio.sleep(1)  # billing reloads the seeded catalog every 0.5 s
    command = command.replace("localhost:50051", stack.gateway).replace(
        "grpcurl ", f"{grpcurl_path()} ", 1
    )
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert output.decode().strip() == expected.strip()
    assert process.returncode == (67 if "InvalidArgument" in expected else 0)


def test_the_readme_documents_every_setting() -> None:
    for settings_class in (GatewaySettings, IngestionSettings, BillingSettings, AnalyticsSettings):
        for variable in env_names(settings_class):
            if variable.endswith("_HOST"):
                assert "`*_HOST`" in README
            else:
                assert f"`{variable}" in README or f"{variable}`" in README, variable
