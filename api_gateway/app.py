"""Composition root of api_gateway: ingestion client, public gRPC server, HTTP/JSON server,
metrics."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

from redis.asyncio import Redis

from api_gateway.adapters.billing import BillingClient, DeviceAccounts
from api_gateway.adapters.credentials import MongoCredentialStore
from api_gateway.adapters.ingestion import IngestionClient
from api_gateway.api import DeviceAdminServicer, GatewayServicer
from api_gateway.auth import Authenticator
from api_gateway.batcher import UnaryBatcher
from api_gateway.guard import Guard
from api_gateway.http.server import HttpServer
from api_gateway.identity import ADMIN_TOKEN, ANY_TOKEN, AuthInterceptor
from api_gateway.ratelimit import RedisRateLimiter
from api_gateway.settings import GatewaySettings
from common.energy.v1 import gateway_pb2, gateway_pb2_grpc
from common.grpc_server import GrpcServer, run_until_terminated
from common.metrics import serve_metrics
from common.tls import server_credentials

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
ADMIN_SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["DeviceAdmin"].full_name


class GatewayApp:
    """Wires the ingestion client into the servicer; ``start`` and ``stop`` for tests and main."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.ingestion = IngestionClient(
            settings.ingestion_addr, settings.ingestion_timeout_s, tls=settings
        )
        # SendReading calls share publishes of up to GATEWAY_BATCH_SIZE readings, like a
        # stream's chunks: the same unit ingestion and the broker see.
        self.unary = UnaryBatcher(
            self.ingestion.publish, settings.batch_size, settings.unary_batches_in_flight
        )
        self.billing = BillingClient(
            settings.billing_addr, settings.billing_timeout_s, tls=settings
        )
        self.credentials = MongoCredentialStore.connect(
            settings.mongodb_url,
            settings.mongodb_database,
            settings.mongodb_timeout_s,
            settings.auth_cache_ttl_s,
        )
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.rate_limit_timeout_s,
            socket_connect_timeout=settings.rate_limit_timeout_s,
        )
        limiter = RedisRateLimiter(
            self.redis,
            settings.rate_limits,
            key_prefix=settings.redis_key_prefix,
            timeout_s=settings.rate_limit_timeout_s,
        )
        admin_token = settings.admin_token.get_secret_value() if settings.admin_token else None
        guard = Guard(
            Authenticator(self.credentials, admin_token),
            settings.auth_enabled,
            limiter,
            settings.rate_limits,
            # Account tokens read their account's devices: the catalog's answers, cached.
            DeviceAccounts(self.billing, settings.auth_cache_ttl_s),
        )
        # Every Gateway call needs a token (device, account or admin), every DeviceAdmin call
        # the admin's; health and reflection need none.
        auth = AuthInterceptor(guard, {SERVICE_NAME: ANY_TOKEN, ADMIN_SERVICE_NAME: ADMIN_TOKEN})
        self.grpc = GrpcServer(
            [SERVICE_NAME, ADMIN_SERVICE_NAME],
            max_message_bytes=settings.max_message_bytes,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            max_concurrent_streams=settings.max_concurrent_streams,
            interceptors=[auth],
            echo_request_id=True,  # the public edge: callers learn the id they can quote
        )
        servicer = GatewayServicer(
            self.ingestion,
            self.unary,
            self.billing,
            guard,
            settings.limits,
            settings.batch_size,
            settings.max_reported_rejections,
            settings.max_stream_readings,
        )
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, self.grpc.server)
        gateway_pb2_grpc.add_DeviceAdminServicer_to_server(
            DeviceAdminServicer(self.credentials, self.billing), self.grpc.server
        )
        # The HTTP server calls this same gRPC server over a unix socket in a private folder
        # (mode 0700): every interceptor and check runs for HTTP callers as for gRPC ones,
        # with no TLS and no port of its own.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="gateway-"))
        socket = f"unix:{self._socket_dir / 'grpc.sock'}"
        self.grpc.server.add_insecure_port(socket)
        self.http = HttpServer(
            [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]],
            socket,
            settings.http_max_body_bytes,
            settings.http_timeout_s,
        )
        self.port = 0
        self.http_port = 0

    async def start(self) -> None:
        if not self.settings.auth_enabled:
            log.warning(
                "authentication is OFF (GATEWAY_AUTH_ENABLED=false): anyone reaching this port "
                "may send readings for any device; never run like this outside a laptop"
            )
        self.port = await self.grpc.start(
            self.settings.host, self.settings.port, server_credentials(self.settings)
        )
        self.http_port = await self.http.start(
            self.settings.host, self.settings.http_port, self.settings.shutdown_grace_s
        )
        log.info("gateway listening", extra={"port": self.port, "http_port": self.http_port})

    async def stop(self) -> None:
        # Both stop taking new requests at once; HTTP requests in progress still reach gRPC,
        # which gives its calls the same grace.
        await asyncio.gather(
            self.http.stop(),
            self.grpc.stop(self.settings.shutdown_grace_s),  # batches go on meanwhile
        )
        shutil.rmtree(self._socket_dir, ignore_errors=True)
        await self.unary.close()
        await self.ingestion.close()
        await self.billing.close()
        await self.redis.aclose()
        self.credentials.close()


async def run(settings: GatewaySettings) -> None:
    serve_metrics(settings.host, settings.metrics_port)
    await run_until_terminated(GatewayApp(settings))
