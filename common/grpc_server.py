"""An asyncio gRPC server with health, reflection and metrics, and its graceful stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.interceptors import RequestIdInterceptor
from common.metrics import MetricsInterceptor, watch_event_loop_lag

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Ping idle connections every 60 s and drop them when no answer comes within 20 s (dead
# NAT entries, vanished loggers); refuse clients that ping more often than every 10 s;
# close connections idle for 5 minutes, and recycle every connection after 30 minutes (with
# 30 s for calls in progress) so load spreads again over replicas added since.
KEEPALIVE_POLICY: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_idle_ms", 300_000),
    ("grpc.max_connection_age_ms", 1_800_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]


class GrpcServer:
    """Owns a ``grpc.aio.Server`` and its health servicer; services add their servicers."""

    def __init__(
        self,
        service_names: Iterable[str],
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_concurrent_rpcs: int | None = None,
        max_concurrent_streams: int | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        echo_request_id: bool = False,
    ):
        """``interceptors`` run inside the metrics and request-id ones, so they see the id
        and their refusals are counted; ``echo_request_id`` returns it to the caller."""
        self.server = grpc.aio.server(
            interceptors=[
                MetricsInterceptor(),
                RequestIdInterceptor(echo=echo_request_id),
                *interceptors,
            ],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                # Answers are bounded by what a service sends (rejections listed, usage
                # windows), not by the request limit: a small request limit must not fail
                # the answer of a stream whose readings were published.
                ("grpc.max_send_message_length", max(max_message_bytes, MAX_MESSAGE_BYTES)),
                # HTTP/2 streams (calls) at once on one client connection; unset: gRPC's own.
                *(
                    [("grpc.max_concurrent_streams", max_concurrent_streams)]
                    if max_concurrent_streams
                    else []
                ),
                *KEEPALIVE_POLICY,
            ],
            # Past this many calls in progress, new ones get RESOURCE_EXHAUSTED at once
            # instead of queueing in memory.
            maximum_concurrent_rpcs=max_concurrent_rpcs,
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


class Service(Protocol):
    """What ``run_until_terminated`` drives: an app with ``start`` and a graceful ``stop``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_until_terminated(service: Service) -> None:
    """Start, serve until SIGTERM or SIGINT, stop gracefully, log how long the stop took.

    ``stop`` is each app's own: it stops taking work, gives in-flight work its grace
    period and closes connections; the process then exits 0. The signals are taken from
    before ``start``: a service may take work before its start-up ends (billing consumes
    before its gRPC port listens), so a signal during start-up cancels what is left of it
    and then stops gracefully whatever had started, instead of killing the process.
    """
    signalled = _termination_signal()
    starting = asyncio.ensure_future(service.start())
    await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    during_start_up = not starting.done()
    if not during_start_up:
        starting.result()  # a start-up that failed ends the process, as before
        # What start-up built lives as long as the process: out of the collector's full
        # passes, which otherwise walk it all and stall every call in flight (a gateway's
        # full pass took 76 ms under load, 27 ms frozen; Python's gc docs advise freeze).
        gc.freeze()
        lag = asyncio.create_task(watch_event_loop_lag())
        await signalled
        lag.cancel()
    else:
        starting.cancel()
        try:
            await starting
        except asyncio.CancelledError:
            pass
        except Exception:  # it failed meanwhile; what had started is stopped all the same
            log.warning("start-up failed while stopping", exc_info=True)
    log.info(
        "termination signal received, shutting down",
        extra={"signal": signalled.result().name, "during_start_up": during_start_up},
    )
    began = time.monotonic()
    await service.stop()
    took_s = round(time.monotonic() - began, 3)
    log.info("shutdown completed in %.3f s", took_s, extra={"shutdown_s": took_s})


def _termination_signal() -> asyncio.Future[signal.Signals]:
    """The first SIGTERM or SIGINT from now on (docker stop, Ctrl-C).

    A second one ends the process at once (exit status 128 + signal): work not acknowledged
    by then is redelivered by RabbitMQ, and callers whose RPC is cut off resend.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()

    def first(sig: signal.Signals) -> None:
        if received.done():  # two signals queued before the handlers below took over
            _exit_at_once(sig)
        received.set_result(sig)
        for again in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(again, _exit_at_once, again)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, first, sig)
    return received


def _exit_at_once(sig: signal.Signals) -> None:
    log.warning(
        "second termination signal: exiting without waiting for in-flight work",
        extra={"signal": sig.name},
    )
    os._exit(128 + sig)
