"""One generic HTTP/JSON ⇄ gRPC transcoder: an HTTP request becomes a call of the gateway's
own gRPC server, its answer (or status) becomes the HTTP response.

The call goes to the same ``grpc.aio`` server loggers reach, over a private unix socket
(``api_gateway.app``), with the caller's ``Authorization`` and ``x-request-id`` as metadata:
every interceptor (request id, metrics, authentication) and every handler check (device
ownership, rate limits, validation, idempotency) runs as for a gRPC caller, and an error
carries the very message a gRPC caller reads. Nothing here knows an RPC by name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from grpc_status import rpc_status

from api_gateway.http.routes import NDJSON_TYPE, BadRequest, Binding, Route, build_request
from common import request_id
from common.errors import error_info, retry_delay_s
from common.request_id import REQUEST_ID_HEADER

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.Response]]
# grpc-gateway's mapping (runtime.HTTPStatusFromCode).
HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# The trailer api_gateway.guard sets on a rate-limit refusal (gRPC's retry pushback).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class BodyTooLarge(Exception):
    """The request body passed the limit; the message names it and the setting."""


def to_json(message: Message) -> dict[str, Any]:
    """proto3 JSON with the .proto's field names (as grpcurl prints them) and every field,
    set or not (grpc-gateway's EmitUnpopulated), so a page need not know the defaults."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def json_response(
    status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body) + b"\n",
        content_type="application/json",
        headers=dict(headers or {}),
    )


def error_response(
    code: grpc.StatusCode,
    message: str,
    http_status: int | None = None,
    headers: Mapping[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
    reason: str | None = None,
) -> web.Response:
    """grpc-gateway's error body: ``{"code": <gRPC code>, "message", "details"}``, plus the
    ``ErrorInfo`` reason (when there is one) at the top for a quick look."""
    body: dict[str, Any] = {"code": code.value[0], "message": message}
    if reason:
        body["reason"] = reason
    body["details"] = details or []
    return json_response(http_status or HTTP_STATUS.get(code, 500), body, headers)


def rpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    """The HTTP answer for a failed call: its status mapped, its message and details as the
    gRPC caller gets them, ``Retry-After`` from its ``RetryInfo`` or retry pushback."""
    code = error.code()
    headers: dict[str, str] = {}
    delay_s = retry_delay_s(error)
    if delay_s is None:
        pushback = dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
        delay_s = int(pushback) / 1000 if isinstance(pushback, str) and pushback.isdigit() else None
    if delay_s is None and code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        delay_s = 1.0  # gRPC's own refusal (too many calls at once) carries no hint
    if delay_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(delay_s)))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="energy"'
    info = error_info(error)
    return error_response(
        code,
        error.details() or code.name,
        headers=headers,
        details=_details(error),
        reason=info.reason if info is not None else None,
    )


def _details(error: grpc.aio.AioRpcError) -> list[dict[str, Any]]:
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a trailer that contradicts the status: not passed on
        return []
    if status is None:
        return []
    shown = []
    for detail in status.details:
        try:
            shown.append(to_json(detail))
        except (TypeError, KeyError, json_format.Error):  # a type this process cannot read
            shown.append({"@type": detail.type_url})
    return shown


class Transcoder:
    """Turns each ``Route`` into an aiohttp handler calling ``channel``'s server."""

    def __init__(self, channel: grpc.aio.Channel, max_body_bytes: int, timeout_s: float) -> None:
        self._channel = channel
        self._max_body_bytes = max_body_bytes
        self._timeout_s = timeout_s

    def handler(self, route: Route, path_fields: Mapping[str, str]) -> Handler:
        """The handler of ``route``; ``path_fields`` maps aiohttp's variable names to the
        template's field paths."""
        calls = {id(b): self._callable(b) for b in route.bindings}

        async def handle(request: web.Request) -> web.Response:
            the_id = request_id.accept(request.headers.get(REQUEST_ID_HEADER))
            path = {field: request.match_info[name] for name, field in path_fields.items()}
            try:
                binding, messages = await self._requests(route, request, path)
            except BadRequest as error:
                response = error_response(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            except BodyTooLarge as error:
                response = error_response(grpc.StatusCode.INVALID_ARGUMENT, str(error), 413)
            else:
                response = await self._answer(
                    calls[id(binding)], binding, messages, request, the_id
                )
            response.headers[REQUEST_ID_HEADER] = the_id
            return response

        return handle

    def _callable(self, binding: Binding) -> Any:
        kind = self._channel.stream_unary if binding.streaming else self._channel.unary_unary
        return kind(
            binding.full_method,
            request_serializer=binding.request_class().SerializeToString,
            response_deserializer=binding.response_class().FromString,
        )

    async def _requests(
        self, route: Route, request: web.Request, path: Mapping[str, str]
    ) -> tuple[Binding, list[Message]]:
        query = list(request.query.items())
        if not route.body:
            assert route.unary is not None  # a streaming RPC always takes a body
            return route.unary, [build_request(route.unary, path, query)]
        raw = await self._read_body(request)
        if request.content_type == NDJSON_TYPE:
            return self._stream(route), self._rows(route, path, query, _ndjson(raw))
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(
                f"body is not JSON ({error}); send a JSON object, a JSON array, or one JSON "
                f"object a line with Content-Type: {NDJSON_TYPE}"
            ) from None
        if isinstance(body, list):
            rows = [(f"element {index}", row) for index, row in enumerate(body)]
            return self._stream(route), self._rows(route, path, query, rows)
        if route.unary is None:
            raise BadRequest(
                f"{route.verb} {route.template} takes a JSON array, or NDJSON with "
                f"Content-Type: {NDJSON_TYPE}"
            )
        return route.unary, [build_request(route.unary, path, query, body)]

    @staticmethod
    def _stream(route: Route) -> Binding:
        if route.stream is None:
            raise BadRequest(f"{route.verb} {route.template} takes one JSON object, not a batch")
        return route.stream

    def _rows(
        self,
        route: Route,
        path: Mapping[str, str],
        query: list[tuple[str, str]],
        rows: list[tuple[str, Any]],
    ) -> list[Message]:
        """One request per ``(where, decoded JSON)`` row; a row that is no request fails
        the whole body, naming its ``where`` (``element 2``, ``line 3``)."""
        binding = self._stream(route)
        messages = []
        for where, row in rows:
            try:
                messages.append(build_request(binding, path, query, row))
            except BadRequest as error:
                raise BadRequest(f"{where}: {error}; nothing was sent") from None
        return messages

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self._max_body_bytes
        too_large = BodyTooLarge(
            f"request body larger than {limit} bytes (GATEWAY_HTTP_MAX_BODY_BYTES); send "
            "fewer readings per request"
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise too_large
        if not body.strip():
            raise BadRequest(
                "empty body; send a JSON object, a JSON array, or NDJSON (Content-Type: "
                f"{NDJSON_TYPE})"
            )
        return bytes(body)

    async def _answer(
        self,
        call: Any,
        binding: Binding,
        messages: list[Message],
        request: web.Request,
        the_id: str,
    ) -> web.Response:
        metadata = [(REQUEST_ID_HEADER, the_id)]
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            # gRPC refuses metadata that is not printable ASCII: such a header is no token.
            plain = authorization.isascii() and authorization.isprintable()
            metadata.append(("authorization", authorization if plain else "Bearer invalid"))
        try:
            if binding.streaming:
                answer = await call(iter(messages), metadata=metadata, timeout=self._timeout_s)
            else:
                answer = await call(messages[0], metadata=metadata, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error)
        return json_response(200, to_json(answer))


def _ndjson(raw: bytes) -> list[tuple[str, Any]]:
    """The decoded lines of an NDJSON body, named ``line <n>`` (from 1); blank lines are
    skipped, so a rejection's index counts JSON values, not lines."""
    rows: list[tuple[str, Any]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except (ValueError, UnicodeDecodeError) as error:
            raise BadRequest(f"line {number}: not JSON ({error}); nothing was sent") from None
    return rows
