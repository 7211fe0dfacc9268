"""The fault tests' steady load, its in-flight estimate and the exact reconciliation."""

from __future__ import annotations

import time
from pathlib import Path

from scripts.reconcile import reconcile, render
from scripts.simulate import FleetConfig, FleetSummary, run_fleet
from tests.conftest import ADMIN_TOKEN
from tests.e2e.conftest import Stack

# A fault test's backlog is up to about 5,000 readings, and billing on a slow machine may
# drain only a few hundred a second: this is how long reconciliation may wait for it.
RECONCILE_WAIT_S = 300


async def steady_load(
    stack: Stack,
    ledger: Path,
    seconds: float = 8,
    batch: int = 0,
    prefix: str = "fault",
    rate: float = 150,
) -> FleetSummary:
    """20 loggers at ``rate`` readings/s that ledger every OK and resend what was refused."""
    config = FleetConfig(
        devices=20,
        rate=rate,
        duration_s=seconds,
        target=stack.gateway,
        batch=batch,
        device_prefix=f"{prefix}-{'b' if batch else 'u'}",
        show_progress=False,
        ledger=str(ledger),
        resend_for_s=120,
        timeout_s=5,
        token=ADMIN_TOKEN,
    )
    return await run_fleet(config)


async def in_flight(stack: Stack) -> int:
    """Readings published but not yet acked by billing (two samples a moment apart)."""
    published = await stack.metric("INGESTION", "ingestion_published_total")
    acked = await stack.metric("BILLING", "consumer_messages_total", {"outcome": "acked"})
    return max(0, int(published - acked))


async def reconciled(
    stack: Stack, ledger: Path, fault: str, in_flight_at_fault: int, recovery_started: float
) -> None:
    """Assert every ledgered reading is billed exactly once; print the figures of the fault."""
    # Returns as soon as billing holds everything; the bound only matters on a slow machine.
    results = await reconcile(ledger, stack.gateway, wait_s=RECONCILE_WAIT_S, token=ADMIN_TOKEN)
    took = time.monotonic() - recovery_started
    report = render(results)
    print(
        f"\nFAULT {fault}: in flight at the fault {in_flight_at_fault}, recovered and "
        f"reconciled {took:.1f} s after the fault ended; {report.splitlines()[-1]}"
    )
    assert all(d.exact for d in results), (
        report + "\n" + stack.logs()[-3000:] + "\n" + stack.logs()[-4000:]
    )
    assert sum(len(d.expected) for d in results) > 0
