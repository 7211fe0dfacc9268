"""run_until_terminated: start, serve until SIGTERM, stop; start-up state out of the GC."""

from __future__ import annotations

import asyncio
import gc
import os
import signal

from common.grpc_server import run_until_terminated


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
