"""One request id from the caller to the broker: answered back, logged by gateway and
ingestion, carried as a message header; upstream failures carry a typed reason."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from api_gateway.app import GatewayApp
from common.energy.v1 import gateway_pb2_grpc
from common.errors import Reason, reason_of
from common.gateway_client import gateway_channel
from common.rabbit import Topology
from common.request_id import (
    LOG_FIELD,
    REQUEST_ID_HEADER,
    RequestIdLogFilter,
    from_message_headers,
)
from ingestion_service.app import IngestionApp
from tests.component.test_ingestion import drain, request, start_pipeline
from tests.conftest import ADMIN_TOKEN, delete_topology, free_port

pytestmark = pytest.mark.component


@pytest.fixture
async def pipeline(prefix: str) -> AsyncIterator[tuple[IngestionApp, GatewayApp]]:
    ingestion, gateway = await start_pipeline(prefix)
    await ingestion.publisher._connecting  # connected before the first RPC
    yield ingestion, gateway
    await gateway.stop()
    await ingestion.stop()
    await delete_topology(prefix)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Records at DEBUG, with the filter the services install on their log handler."""
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RequestIdLogFilter())
    return caplog


def services_logging(caplog: pytest.LogCaptureFixture, the_id: str) -> set[str]:
    """The services (top-level logger names) with a log line carrying ``the_id``."""
    return {
        r.name.partition(".")[0] for r in caplog.records if getattr(r, LOG_FIELD, None) == the_id
    }


async def send(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    """Send one reading; return the request id the gateway answered in trailing metadata."""
    async with gateway_channel(f"127.0.0.1:{port}", ADMIN_TOKEN) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).SendReading(
            request(), metadata=metadata, timeout=10
        )
        await call
        answered = dict(await call.trailing_metadata())
    return str(answered[REQUEST_ID_HEADER])


async def test_a_generated_id_is_answered_logged_and_sent_with_the_message(
    pipeline, prefix: str, logs: pytest.LogCaptureFixture
) -> None:
    _, gateway = pipeline
    the_id = await send(gateway.port)
    assert len(the_id) == 32  # a uuid4, hex
    assert {"api_gateway", "ingestion_service"} <= services_logging(logs, the_id)
    [message] = await drain(Topology(prefix).billing_queue)
    assert from_message_headers(message.headers) == the_id


async def test_a_callers_id_is_kept_and_an_unfit_one_replaced(
    pipeline, prefix: str, logs: pytest.LogCaptureFixture
) -> None:
    _, gateway = pipeline
    mine = "logger-7f3a:0042"
    assert await send(gateway.port, ((REQUEST_ID_HEADER, mine),)) == mine
    assert {"api_gateway", "ingestion_service"} <= services_logging(logs, mine)
    [message] = await drain(Topology(prefix).billing_queue)
    assert message.headers[REQUEST_ID_HEADER] == mine

    unfit = "x" * 129  # longer than a log field should carry
    replaced = await send(gateway.port, ((REQUEST_ID_HEADER, unfit),))
    assert replaced != unfit and len(replaced) == 32


async def test_broker_down_is_a_typed_reason_logged_by_both_services(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """At the default level a failure's id finds the gateway's and ingestion's warnings."""
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(RequestIdLogFilter())
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    ingestion, gateway = await start_pipeline(prefix, rabbitmq_url=closed)
    try:
        async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.GatewayStub(channel).SendReading(
                    request(), metadata=((REQUEST_ID_HEADER, "down-1"),), timeout=10
                )
    finally:
        await gateway.stop()
        await ingestion.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(caught.value) == Reason.BROKER_UNAVAILABLE
    # The failure's trailers carry both the typed reason and the echoed id.
    assert dict(caught.value.trailing_metadata())[REQUEST_ID_HEADER] == "down-1"
    assert {"api_gateway", "ingestion_service"} <= services_logging(caplog, "down-1")


async def test_a_refused_call_answers_its_id_too(pipeline) -> None:
    _, gateway = pipeline
    async with gateway_channel(f"127.0.0.1:{gateway.port}", ADMIN_TOKEN) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_pb2_grpc.GatewayStub(channel).SendReading(
                request(kwh=-1), metadata=((REQUEST_ID_HEADER, "bad-1"),), timeout=10
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(caught.value.trailing_metadata())[REQUEST_ID_HEADER] == "bad-1"
