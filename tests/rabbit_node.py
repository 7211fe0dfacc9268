"""A private RabbitMQ node (the rabbitmq-server that make services installs) that a test can
SIGKILL and start again on the same data, while the shared node stays up for the others."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import uuid
from pathlib import Path

import aio_pika
import httpx

from tests.conftest import free_port, wait_until

RABBITMQ_BIN = Path(os.environ.get("RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
# A node boots in 5-10 s here; a loaded slow machine may take several times that.
BOOT_TIMEOUT_S = 120


class RabbitNode:
    """``rabbitmq-server`` as a node of its own: its name, ports, data and logs.

    The node keeps its data (``data_dir``) across :meth:`kill` and :meth:`start`, so durable
    queues and the persistent messages they held come back as after a power cut.
    """

    def __init__(self, data_dir: Path) -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists():
            raise RuntimeError(f"{server} is missing; run `make services` (or set RABBITMQ_BIN)")
        self.name = f"test-{uuid.uuid4().hex[:8]}@localhost"
        self.data_dir = data_dir
        self.port, self.management_port = free_port(), free_port()
        self.prometheus_port, self.distribution_port = free_port(), free_port()
        self.process: asyncio.subprocess.Process | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_port}\n"
            f"prometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = {self.prometheus_port}\n"
        )
        (data_dir / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": os.environ.get("HOME", "/root"),  # the Erlang cookie of the CLI tools
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.distribution_port),
            "RABBITMQ_CONFIG_FILE": str(self.data_dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.data_dir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.data_dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.data_dir / "log"),
            "RABBITMQ_PID_FILE": str(self.data_dir / "pid"),
        }

    async def start(self) -> None:
        """Boot the node (on its data as left) and wait until it serves AMQP and its API."""
        log = (self.data_dir / "server.out").open("ab")
        self.process = await asyncio.create_subprocess_exec(
            str(RABBITMQ_BIN / "rabbitmq-server"),
            env=self._env(),
            cwd=self.data_dir,  # where Mnesia writes a core file if the node dies badly
            stdout=log,
            stderr=log,
            start_new_session=True,  # the node's Erlang helpers go with it on a kill
        )
        log.close()
        await wait_until(self._serving, timeout_s=BOOT_TIMEOUT_S, what=f"RabbitMQ node {self.name}")

    async def _serving(self) -> bool:
        assert self.process is not None
        if self.process.returncode is not None:
            output = (self.data_dir / "server.out").read_text()[-3000:]
            raise AssertionError(f"RabbitMQ node {self.name} exited:\n{output}")
        try:  # the API may answer before the AMQP listener is up: wait for both
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.close()
            async with httpx.AsyncClient(timeout=2, auth=("guest", "guest")) as client:
                answer = await client.get(f"{self.management_url}/api/health/checks/alarms")
        except (OSError, httpx.HTTPError):
            return False
        return answer.status_code == 200

    async def kill(self) -> None:
        """SIGKILL the node's processes: no clean shutdown, nothing flushed on the way out."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.wait_for(self.process.wait(), timeout=30)

    async def restart(self) -> None:
        """Stop the node cleanly (SIGTERM: it writes out its state) and start it on its data."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        await asyncio.wait_for(self.process.wait(), timeout=60)
        await self.start()

    async def consumers(self, queue: str) -> int:
        """How many consumers the queue has now, as the broker counts them (a passive
        declare: the management API's figures lag by seconds after a boot)."""
        connection = await aio_pika.connect(self.url, timeout=10)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            return int(declared.declaration_result.consumer_count or 0)

    async def stop(self) -> None:
        """Stop the node for good and remove its data: SIGKILL, as nothing it would write out
        on a clean stop (several seconds here) is kept."""
        if self.process is not None and self.process.returncode is None:
            await self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
