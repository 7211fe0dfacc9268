"""TLS on the gRPC ports: mTLS to ingestion, TLS without client certificates, settings checks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from api_gateway.adapters.ingestion import IngestionClient
from common.convert import reading_to_proto
from common.energy.v1 import reading_pb2
from common.grpc_server import GrpcServer
from common.models import Reading, derive_reading_id
from common.rabbit import Topology
from common.settings import load_settings
from common.tls import (
    InternalClientTlsSettings,
    ServerTlsSettings,
    client_channel,
    server_credentials,
)
from ingestion_service.app import IngestionApp
from ingestion_service.settings import IngestionSettings
from tests.conftest import RABBITMQ_URL, delete_topology, ready_count

T = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@dataclass(frozen=True)
class Pki:
    """PEM files of one test CA, a server certificate for 127.0.0.1 and a client one."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("gateway.internal")
    pki = Pki(*(folder / name for name in ("ca", "server", "server.key", "client", "client.key")))
    ca.cert_pem.write_to_path(str(pki.ca))
    server.cert_chain_pems[0].write_to_path(str(pki.server_cert))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.cert_chain_pems[0].write_to_path(str(pki.client_cert))
    client.private_key_pem.write_to_path(str(pki.client_key))
    return pki


def reading() -> reading_pb2.Reading:
    return reading_to_proto(Reading("meter-1", T, 1.5, derive_reading_id("meter-1", T)))


@pytest.fixture
async def mtls_ingestion(prefix: str, pki: Pki) -> AsyncIterator[str]:
    """An ingestion service that requires client certificates; yields its address."""
    app = IngestionApp(
        IngestionSettings(
            port=0,
            topology_prefix=prefix,
            rabbitmq_url=RABBITMQ_URL,
            confirm_timeout_s=3,
            tls_cert_file=pki.server_cert,
            tls_key_file=pki.server_key,
            tls_client_ca_file=pki.ca,
        )
    )
    await app.start()
    await app.publisher._connecting  # connected before the first RPC
    yield f"127.0.0.1:{app.port}"
    await app.stop()
    await delete_topology(prefix)


async def test_a_client_with_a_certificate_publishes_over_mtls(
    mtls_ingestion: str, pki, prefix: str
) -> None:
    tls = InternalClientTlsSettings(
        internal_tls_ca_file=pki.ca,
        internal_tls_cert_file=pki.client_cert,
        internal_tls_key_file=pki.client_key,
    )
    client = IngestionClient(mtls_ingestion, timeout_s=5, tls=tls)
    try:
        await client.publish([reading()])
    finally:
        await client.close()
    topology = Topology(prefix)  # published and confirmed: in both queues
    assert await ready_count(topology.billing_queue) == 1
    assert await ready_count(topology.analytics_queue) == 1


@pytest.mark.parametrize(
    "tls",
    [None, "ca only"],
    ids=["plaintext", "tls without a client certificate"],
)
async def test_mtls_refuses_clients_without_a_certificate(
    mtls_ingestion, pki, tls, prefix: str
) -> None:
    client_tls = InternalClientTlsSettings(internal_tls_ca_file=pki.ca) if tls else None
    client = IngestionClient(mtls_ingestion, timeout_s=3, tls=client_tls)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.publish([reading()])
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.close()
    topology = Topology(prefix)  # refused: published nowhere
    assert await ready_count(topology.billing_queue) == 0
    assert await ready_count(topology.analytics_queue) == 0


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[str]:
    """A bare GrpcServer (health only) serving TLS, without client certificates."""
    server = GrpcServer([])
    settings = ServerTlsSettings(tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    port = await server.start("127.0.0.1", 0, server_credentials(settings))
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    return response.status


async def test_a_tls_client_trusting_the_ca_is_served(tls_server: str, pki: Pki) -> None:
    tls = InternalClientTlsSettings(internal_tls_ca_file=pki.ca)
    async with client_channel(tls_server, tls) as channel:
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_a_plaintext_client_is_not_served_over_tls(tls_server: str) -> None:
    async with client_channel(tls_server, None) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_the_default() -> None:
    assert server_credentials(IngestionSettings()) is None


def test_the_prefixed_variables_are_read(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    monkeypatch.setenv("INGESTION_TLS_CERT_FILE", str(pki.server_cert))
    monkeypatch.setenv("INGESTION_TLS_KEY_FILE", str(pki.server_key))
    monkeypatch.setenv("TLS_CLIENT_CA_FILE", str(pki.ca))  # no prefix: not this service's
    settings = IngestionSettings()
    assert (settings.tls_cert_file, settings.tls_client_ca_file) == (pki.server_cert, None)
    assert isinstance(server_credentials(settings), grpc.ServerCredentials)


def test_a_cert_without_its_key_names_the_missing_variable(pki: Pki) -> None:
    with pytest.raises(
        ValidationError, match="set both INGESTION_TLS_CERT_FILE and INGESTION_TLS_KEY_FILE"
    ):
        IngestionSettings(tls_cert_file=pki.server_cert)


def test_a_client_ca_without_server_tls_is_refused(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="INGESTION_TLS_CLIENT_CA_FILE needs"):
        IngestionSettings(tls_client_ca_file=pki.ca)


def test_a_client_certificate_needs_the_ca(pki: Pki) -> None:
    with pytest.raises(ValidationError, match="INTERNAL_TLS_CERT_FILE needs INTERNAL_TLS_CA_FILE"):
        InternalClientTlsSettings(
            internal_tls_cert_file=pki.client_cert, internal_tls_key_file=pki.client_key
        )


def test_an_unreadable_file_exits_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INGESTION_TLS_CERT_FILE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("INGESTION_TLS_KEY_FILE", str(tmp_path))  # a folder, not a file
    with pytest.raises(SystemExit) as caught:
        load_settings(IngestionSettings)
    message = str(caught.value)
    assert "INGESTION_TLS_CERT_FILE=" in message and "missing.pem is not a readable file" in message
    assert "INGESTION_TLS_KEY_FILE=" in message


def test_a_cross_field_error_does_not_print_other_values(
    monkeypatch: pytest.MonkeyPatch, pki: Pki
) -> None:
    monkeypatch.setenv("RABBITMQ_URL", "amqp://user:s3cret@broker/")
    monkeypatch.setenv("INGESTION_TLS_KEY_FILE", str(pki.server_key))
    with pytest.raises(SystemExit) as caught:
        load_settings(IngestionSettings)
    assert "INGESTION_TLS_CERT_FILE" in str(caught.value) and "s3cret" not in str(caught.value)


def test_both_mixins_keep_their_checks(pki: Pki) -> None:
    """The gateway serves and calls: a class with both mixins runs both sets of validators."""

    class Both(ServerTlsSettings, InternalClientTlsSettings):
        model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    with pytest.raises(ValidationError, match="GATEWAY_TLS_KEY_FILE"):
        Both(tls_cert_file=pki.server_cert)
    with pytest.raises(ValidationError, match="GATEWAY_INTERNAL_TLS_KEY_FILE"):
        Both(internal_tls_ca_file=pki.ca, internal_tls_cert_file=pki.client_cert)
