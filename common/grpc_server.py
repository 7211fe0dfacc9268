"""An asyncio gRPC server with health, reflection and metrics, and its graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.metrics import MetricsInterceptor

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class GrpcServer:
    """Owns a ``grpc.aio.Server`` and its health servicer; services add their servicers."""

    def __init__(self, service_names: Iterable[str], max_message_bytes: int = MAX_MESSAGE_BYTES):
        self.server = grpc.aio.server(
            interceptors=[MetricsInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )

    async def start(
        self, host: str, port: int, credentials: grpc.ServerCredentials | None = None
    ) -> int:
        """Bind (TLS with ``credentials``, else plaintext), start, return the bound port."""
        address = f"{host}:{port}"
        if credentials is None:
            bound = self.server.add_insecure_port(address)
        else:
            bound = self.server.add_secure_port(address, credentials)
        if bound == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        await self.server.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new RPCs, give in-flight ones ``grace_s`` to finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def wait_for_termination_signal() -> None:
    """Return on SIGTERM or SIGINT (docker stop, Ctrl-C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("termination signal received, shutting down")
