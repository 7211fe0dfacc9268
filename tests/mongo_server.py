"""A private MongoDB-wire server (the SecantusDB that make services installs) that a test
can kill, stop and start again on the same data, while the shared one stays up."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.conftest import free_port, wait_until

STATE_DIR = Path(os.environ.get("ENERGY_STATE_DIR", Path.home() / ".local/state/energy-platform"))
SECANTUSD = Path(os.environ.get("SECANTUSD", STATE_DIR / "secantusdb-venv/bin/secantusd-py"))


class LocalMongo:
    """``secantusd-py`` on a port of its own, its data in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        if not SECANTUSD.exists():
            raise RuntimeError(f"{SECANTUSD} is missing; run `make services` (or set SECANTUSD)")
        self.port = free_port()
        self.data_dir = data_dir
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            str(SECANTUSD),
            *("--host", "127.0.0.1", "--port", str(self.port), "--standalone"),
            *("--storage-path", str(self.data_dir), "--log-level", "ERROR"),
        )

        async def listening() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, timeout_s=60, what="private MongoDB server listening")

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server: SIGTERM (clean) or SIGKILL (a crash: no chance to flush)."""
        assert self.process is not None
        self.process.send_signal(sig)
        await asyncio.wait_for(self.process.wait(), timeout=30)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None
