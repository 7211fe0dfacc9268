"""The committed OpenAPI document is the one the protos generate (make openapi)."""

from __future__ import annotations

import json

import pytest

from api_gateway.http.openapi import generate
from api_gateway.http.routes import BadRequest, build_request, routes_of
from api_gateway.http.server import OPENAPI_FILE
from common.energy.v1 import gateway_pb2

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]


def test_the_committed_openapi_document_matches_the_protos() -> None:
    generated = generate()
    committed = OPENAPI_FILE.read_text() if OPENAPI_FILE.is_file() else ""
    assert committed == generated, (
        f"{OPENAPI_FILE} differs from what common/energy/v1/*.proto generate: run make openapi "
        "and commit the file"
    )


def test_every_annotated_route_is_documented_with_its_parameters() -> None:
    paths = json.loads(generate())["paths"]
    for route in routes_of([GATEWAY]):
        operation = paths[route.template][route.verb.lower()]
        names = {p["name"] for p in operation.get("parameters", [])}
        assert set(route.bindings[0].variables) <= names
    usage = paths["/v1/devices/{device_id}/usage"]["get"]["parameters"]
    assert [p["name"] for p in usage] == ["device_id", "start", "end", "window", "time_zone"]
    post = paths["/v1/readings"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "application/x-ndjson"}


def test_one_route_holds_the_unary_and_the_streaming_rpc() -> None:
    [readings] = [r for r in routes_of([GATEWAY]) if r.template == "/v1/readings"]
    assert readings.unary is not None and readings.unary.method.name == "SendReading"
    assert readings.stream is not None and readings.stream.method.name == "SendReadings"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ([("windows", "1h")], "query parameter 'windows' is not a field"),
        ([("start", "yesterday")], "start: Failed to parse timestamp"),
        ([("window", "1h"), ("window", "1d")], "given 2 times"),
    ],
)
def test_query_parameters_are_checked(query: list[tuple[str, str]], message: str) -> None:
    [usage] = [r for r in routes_of([GATEWAY]) if r.template.endswith("/usage")]
    assert usage.unary is not None
    with pytest.raises(BadRequest, match=message):
        build_request(usage.unary, {"device_id": "m-1"}, query)
    request = build_request(
        usage.unary, {"device_id": "m-1"}, [("start", "2026-10-01T00:00:00Z"), ("window", "1h")]
    )
    assert (request.device_id, request.window, request.start.seconds) == ("m-1", "1h", 1790812800)
