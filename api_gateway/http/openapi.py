"""The OpenAPI 3 document of the HTTP API, generated from the protos.

Paths come from the ``google.api.http`` annotations (the same ``routes_of`` the server
serves), schemas from the messages, descriptions from the .proto comments (read from a
descriptor set that ``protoc --include_source_info`` writes: the generated modules carry
no comments). ``scripts/openapi.py`` writes it to ``api_gateway/http/openapi.json``; a
unit test fails when the committed file differs from what the protos generate.
"""

from __future__ import annotations

import importlib.resources
import json
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from api_gateway.http.routes import NDJSON_TYPE, Binding, Route, is_repeated, routes_of

F = FieldDescriptor
_SCALARS: dict[int, dict[str, str]] = {
    F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    F.TYPE_FLOAT: {"type": "number", "format": "float"},
    F.TYPE_INT32: {"type": "integer", "format": "int32"},
    F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    # proto3 JSON writes 64-bit integers as strings (JavaScript numbers stop at 2^53).
    F.TYPE_INT64: {"type": "string", "format": "int64"},
    F.TYPE_SINT64: {"type": "string", "format": "int64"},
    F.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    F.TYPE_UINT64: {"type": "string", "format": "uint64"},
    F.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    F.TYPE_BOOL: {"type": "boolean"},
    F.TYPE_STRING: {"type": "string"},
    F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
_WELL_KNOWN: dict[str, dict[str, str]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
}
ERROR_SCHEMA = "Error"
_ERROR_STATUSES = {
    "400": "INVALID_ARGUMENT or FAILED_PRECONDITION: the message says what to fix",
    "401": "UNAUTHENTICATED: no token, or an unknown or revoked one",
    "403": "PERMISSION_DENIED: the token may not act for this device or account",
    "404": "NOT_FOUND",
    "413": "the request body is larger than GATEWAY_HTTP_MAX_BODY_BYTES",
    "429": "RESOURCE_EXHAUSTED: rate limit; wait Retry-After seconds and resend",
    "503": "UNAVAILABLE: an upstream service or the broker is down; resend the same request",
    "504": "DEADLINE_EXCEEDED: resend the same request (readings are idempotent)",
}


def source_comments(proto_files: Sequence[str], include: Sequence[str]) -> dict[str, str]:
    """The leading comments of every message, field, enum, value, service and RPC in
    ``proto_files``, by full name (``energy.v1.Reading.usage_kwh``)."""
    with tempfile.TemporaryDirectory() as folder:
        out = pathlib.Path(folder) / "set.pb"
        # A child process: grpc_tools' protoc writes its errors to the console directly.
        command = [sys.executable, "-m", "grpc_tools.protoc"]
        command += [f"-I{path}" for path in include]
        command += ["--include_source_info", f"--descriptor_set_out={out}", *proto_files]
        subprocess.run(command, check=True, capture_output=True, text=True)
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    comments: dict[str, str] = {}
    for file in files.file:
        by_path = {
            tuple(location.path): _clean(location.leading_comments)
            for location in file.source_code_info.location
            if location.leading_comments
        }
        package = file.package
        for index, message in enumerate(file.message_type):
            _message_comments(message, f"{package}.{message.name}", (4, index), by_path, comments)
        for index, enum in enumerate(file.enum_type):
            _enum_comments(enum, f"{package}.{enum.name}", (5, index), by_path, comments)
        for index, service in enumerate(file.service):
            name = f"{package}.{service.name}"
            _put(comments, name, by_path.get((6, index)))
            for m_index, method in enumerate(service.method):
                _put(comments, f"{name}.{method.name}", by_path.get((6, index, 2, m_index)))
    return comments


def _message_comments(
    message: descriptor_pb2.DescriptorProto,
    name: str,
    path: tuple[int, ...],
    by_path: dict[tuple[int, ...], str],
    comments: dict[str, str],
) -> None:
    _put(comments, name, by_path.get(path))
    for index, field in enumerate(message.field):
        _put(comments, f"{name}.{field.name}", by_path.get((*path, 2, index)))
    for index, nested in enumerate(message.nested_type):
        _message_comments(nested, f"{name}.{nested.name}", (*path, 3, index), by_path, comments)
    for index, enum in enumerate(message.enum_type):
        _enum_comments(enum, f"{name}.{enum.name}", (*path, 4, index), by_path, comments)


def _enum_comments(
    enum: descriptor_pb2.EnumDescriptorProto,
    name: str,
    path: tuple[int, ...],
    by_path: dict[tuple[int, ...], str],
    comments: dict[str, str],
) -> None:
    _put(comments, name, by_path.get(path))
    for index, value in enumerate(enum.value):
        _put(comments, f"{name}.{value.name}", by_path.get((*path, 2, index)))


def _put(comments: dict[str, str], name: str, text: str | None) -> None:
    if text:
        comments[name] = text


def _clean(comment: str) -> str:
    return " ".join(line.strip() for line in comment.strip().splitlines() if line.strip())


class _Builder:
    def __init__(self, comments: dict[str, str]) -> None:
        self.comments = comments
        self.schemas: dict[str, Any] = {}

    def ref(self, message: Descriptor) -> dict[str, Any]:
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        if message.full_name not in self.schemas:
            self.schemas[message.full_name] = {}  # placeholder: recursive messages terminate
            self.schemas[message.full_name] = self._object(message)
        return {"$ref": f"#/components/schemas/{message.full_name}"}

    def _object(self, message: Descriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object"}
        self._describe(schema, message.full_name)
        schema["properties"] = {f.name: self.field(f) for f in message.fields}
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.field(value)}
        else:
            schema = self._single(field)
            if is_repeated(field):
                schema = {"type": "array", "items": schema}
        if "$ref" not in schema:  # OpenAPI 3.0 ignores siblings of $ref
            self._describe(schema, field.full_name)
        return schema

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            return self.ref(field.message_type)
        if field.enum_type is not None:
            return self._enum(field.enum_type)
        return dict(_SCALARS[field.type])

    def _enum(self, enum: EnumDescriptor) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.values]}
        named = ((v.name, self.comments.get(f"{enum.full_name}.{v.name}")) for v in enum.values)
        described = [f"{name}: {text}" for name, text in named if text]
        if described:
            schema["description"] = "; ".join(described)
        return schema

    def _describe(self, schema: dict[str, Any], full_name: str) -> None:
        text = self.comments.get(full_name)
        if text and "description" not in schema:
            schema["description"] = text

    def parameters(self, binding: Binding) -> list[dict[str, Any]]:
        found = []
        for name in binding.variables:
            found.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "schema": self._param_schema(binding.method.input_type, name),
                }
            )
        for field in binding.query_fields():
            for name, leaf in _query_leaves(field, field.name):
                schema = self.field(leaf)
                parameter = {"name": name, "in": "query", "required": False, "schema": schema}
                if "description" in schema:
                    parameter["description"] = schema.pop("description")
                found.append(parameter)
        return found

    def _param_schema(self, message: Descriptor, name: str) -> dict[str, Any]:
        leaf = None
        for part in name.split("."):
            leaf = message.fields_by_name[part]
            message = leaf.message_type
        assert leaf is not None
        schema = self.field(leaf)
        return schema

    def operation(self, route: Route) -> dict[str, Any]:
        first = route.unary or route.stream
        assert first is not None
        service = first.method.containing_service
        ids = [f"{service.name}_{b.method.name}" for b in route.bindings]
        texts = [self.comments.get(b.method.full_name, "") for b in route.bindings]
        operation: dict[str, Any] = {
            "operationId": ids[0],
            "summary": " / ".join(b.method.name for b in route.bindings),
        }
        description = " ".join(t for t in texts if t)
        if description:
            operation["description"] = description
        operation["tags"] = [service.name]
        parameters = self.parameters(first)
        if parameters:
            operation["parameters"] = parameters
        if route.body:
            operation["requestBody"] = self._request_body(route)
        operation["responses"] = {"200": self._ok(route)} | {
            status: {"$ref": f"#/components/responses/{status}"}
            for status in _ERROR_STATUSES
            if route.body or status != "413"
        }
        return operation

    def _body_schema(self, binding: Binding) -> dict[str, Any]:
        if binding.body == "*":
            return self.ref(binding.method.input_type)
        return self.field(binding.method.input_type.fields_by_name[binding.body])

    def _request_body(self, route: Route) -> dict[str, Any]:
        options = []
        if route.unary is not None:
            options.append(self._body_schema(route.unary))
        if route.stream is not None:
            options.append({"type": "array", "items": self._body_schema(route.stream)})
        content: dict[str, Any] = {
            "application/json": {"schema": options[0] if len(options) == 1 else {"oneOf": options}}
        }
        if route.stream is not None:
            content[NDJSON_TYPE] = {
                "schema": self._body_schema(route.stream),
                "description": "one JSON object a line",
            }
        return {"required": True, "content": content}

    def _ok(self, route: Route) -> dict[str, Any]:
        schemas = [self.ref(b.method.output_type) for b in route.bindings]
        schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}


def _query_leaves(field: FieldDescriptor, name: str, depth: int = 0) -> Iterable[tuple[str, Any]]:
    """Query parameter names for ``field``: itself, or ``a.b`` for a nested message's fields."""
    message = field.message_type
    if message is None or message.full_name in _WELL_KNOWN or message.GetOptions().map_entry:
        yield name, field
    elif depth < 3:
        for child in message.fields:
            yield from _query_leaves(child, f"{name}.{child.name}", depth + 1)


def openapi_document(services: Sequence[Any], comments: dict[str, str]) -> dict[str, Any]:
    """The OpenAPI 3.0 document of ``services``' annotated RPCs."""
    builder = _Builder(comments)
    paths: dict[str, Any] = {}
    for route in routes_of(services):
        paths.setdefault(route.template, {})[route.verb.lower()] = builder.operation(route)
    error = {
        "type": "object",
        "description": "A failed call, as grpc-gateway writes it (google.rpc.Status).",
        "properties": {
            "code": {"type": "integer", "description": "the gRPC status code"},
            "message": {"type": "string", "description": "what a gRPC caller reads"},
            "reason": {"type": "string", "description": "google.rpc.ErrorInfo reason, if any"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"@type": {"type": "string"}},
                    "additionalProperties": True,
                },
            },
        },
        "required": ["code", "message", "details"],
    }
    responses = {}
    for status, text in _ERROR_STATUSES.items():
        response: dict[str, Any] = {
            "description": text,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}
            },
        }
        if status == "429":
            response["headers"] = {
                "Retry-After": {
                    "description": "seconds to wait before resending",
                    "schema": {"type": "integer"},
                }
            }
        responses[status] = response
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Smart energy platform",
            "version": "v1",
            "description": (
                "The gateway's gRPC API (energy.v1.Gateway) over HTTP/JSON, generated from the "
                "google.api.http annotations in common/energy/v1/gateway.proto. JSON uses the "
                ".proto field names; timestamps are RFC 3339; 64-bit integers are strings."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a device token, an account token or the admin token",
                }
            },
            "schemas": {**dict(sorted(builder.schemas.items())), ERROR_SCHEMA: error},
            "responses": responses,
        },
    }


def generate() -> str:
    """The OpenAPI document of energy.v1.Gateway from the .proto files beside its stubs."""
    import google.api

    from common.energy.v1 import gateway_pb2

    protos = pathlib.Path(gateway_pb2.__file__).parent
    root = protos.parents[2]
    include = [
        str(root),
        str(pathlib.Path(google.api.__path__[0]).parents[1]),
        str(importlib.resources.files("grpc_tools") / "_proto"),
    ]
    files = sorted(str(path) for path in protos.glob("*.proto"))
    comments = source_comments(files, include)
    return render(openapi_document([gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]], comments))


def render(document: dict[str, Any]) -> str:
    """The document as the committed file holds it."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
