"""run_until_terminated: start, serve until SIGTERM, stop; start-up state out of the GC; the
event loop's lag measured."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import REGISTRY

from common.grpc_server import run_until_terminated
from common.metrics import watch_event_loop_lag


class Service:
    def __init__(self) -> None:
        self.frozen_while_serving = -1
        self.stopped = False

    async def start(self) -> None:
        asyncio.get_running_loop().call_later(0.1, self._serving)

    def _serving(self) -> None:
        self.frozen_while_serving = gc.get_freeze_count()
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self.stopped = True


async def test_what_start_built_is_frozen_out_of_full_collections_until_the_stop() -> None:
    gc.unfreeze()
    service = Service()
    try:
        await asyncio.wait_for(run_until_terminated(service), timeout=10)
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        gc.unfreeze()
    assert service.frozen_while_serving > 0
    assert service.stopped


# A service that takes work during start-up and then waits on something that never comes
# (billing consumes before its gRPC port listens; any start-up may wait for a dependency).
STUCK_IN_START_UP = """
import asyncio, sys
from common.grpc_server import run_until_terminated

class Service:
    async def start(self):
        print("taking work", flush=True)
        await asyncio.Event().wait()

    async def stop(self):
        print("stopped gracefully", flush=True)

asyncio.run(run_until_terminated(Service()))
"""


def test_a_signal_during_start_up_stops_what_started_gracefully() -> None:
    """Without the handlers installed before start-up, SIGTERM killed such a process: no
    graceful stop for the work it had taken."""
    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_IN_START_UP],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "taking work"
        process.send_signal(signal.SIGTERM)
        remaining, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0
    assert remaining.strip() == "stopped gracefully"


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    before = _lag_count_over(0.25)
    watcher = asyncio.create_task(watch_event_loop_lag(interval_s=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # noqa: ASYNC251 - on purpose: a callback that holds the loop
    await asyncio.sleep(0.05)
    watcher.cancel()
    # At least the blocked one: a machine under load may add late timers of its own.
    assert _lag_count_over(0.25) >= before + 1


def _lag_count_over(seconds: float) -> float:
    """Observations of event_loop_lag_seconds above ``seconds`` (a bucket bound) so far."""
    total = REGISTRY.get_sample_value("event_loop_lag_seconds_count")
    within = REGISTRY.get_sample_value("event_loop_lag_seconds_bucket", {"le": str(seconds)})
    return (total or 0.0) - (within or 0.0)
