"""HTTP routes read from the ``google.api.http`` annotations of a gRPC service, and the
binding of a path, a query and a JSON body to the request message.

The protos declare each route once (``option (google.api.http) = {get: "/v1/..."}``); this
module reads them from the descriptors, so nothing here names an RPC. Pure: no I/O.

Conventions (grpc-gateway's, with proto field names):
- a path variable ``{field}`` (or ``{a.b}``) matches one segment and sets that field;
- ``body: "*"`` takes the whole JSON body as the request, ``body: "field"`` that field;
- every request field not bound by the path or the body may be sent as a query parameter
  (``?start=2026-10-01T00:00:00Z&page_size=10``; repeat a key for a repeated field);
- JSON is proto3 JSON: field names as in the .proto (lowerCamelCase accepted on input),
  timestamps RFC 3339, 64-bit integers as strings.
- A route may carry one unary RPC and one client-streaming RPC (``POST /v1/readings``):
  a JSON object goes to the unary one, a JSON array or NDJSON to the streaming one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

VERBS = ("get", "put", "post", "delete", "patch")
NDJSON_TYPE = "application/x-ndjson"  # a batch for a client-streaming RPC, a request a line
_VARIABLE = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:=\*)?\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~-]+$")


class BadRequest(Exception):
    """The HTTP request cannot become the RPC's request; the message says what to fix."""


@dataclass(frozen=True)
class Binding:
    """One RPC bound to a verb and a path template by its annotation."""

    method: MethodDescriptor
    verb: str  # upper case: GET, POST, ...
    template: str  # /v1/devices/{device_id}/latest
    body: str  # "" (no body), "*" (the whole request) or a top-level field name

    @property
    def full_method(self) -> str:
        """The gRPC method path, ``/energy.v1.Gateway/GetUsage``."""
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streaming(self) -> bool:
        return bool(self.method.client_streaming)

    @property
    def variables(self) -> tuple[str, ...]:
        return template_variables(self.template)

    def request_class(self) -> type[Message]:
        return GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return GetMessageClass(self.method.output_type)

    def query_fields(self) -> list[FieldDescriptor]:
        """Top-level request fields a query parameter may set: not in the path or the body."""
        if self.body == "*":
            return []
        bound = {name.split(".")[0] for name in self.variables} | {self.body}
        return [f for f in self.method.input_type.fields if f.name not in bound]


@dataclass
class Route:
    """A verb and template with its RPCs: at most one unary and one client-streaming."""

    verb: str
    template: str
    unary: Binding | None = None
    stream: Binding | None = None

    @property
    def bindings(self) -> list[Binding]:
        return [b for b in (self.unary, self.stream) if b is not None]

    @property
    def body(self) -> str:
        return self.bindings[0].body


def template_variables(template: str) -> tuple[str, ...]:
    """The field paths of a template's ``{variables}``, in order."""
    names = []
    for segment in template.strip("/").split("/"):
        match = _VARIABLE.match(segment)
        if match:
            names.append(match.group(1))
    return tuple(names)


def _check_template(template: str, where: str) -> None:
    if not template.startswith("/"):
        raise ValueError(f"{where}: path {template!r} must start with /")
    for segment in template.strip("/").split("/"):
        if not (_VARIABLE.match(segment) or _LITERAL.match(segment)):
            raise ValueError(
                f"{where}: path segment {segment!r} is not supported: use literals and "
                "single-segment variables {field} or {field=*}"
            )


def _rules(rule: http_pb2.HttpRule) -> Iterable[http_pb2.HttpRule]:
    yield rule
    yield from rule.additional_bindings


def routes_of(services: Sequence[Any]) -> list[Route]:
    """The routes the ``google.api.http`` annotations of ``services`` declare.

    Raises ``ValueError`` naming the RPC for an annotation this transcoder cannot serve
    (server streaming, a custom verb, a body on GET, a field the path names that does not
    exist, two RPCs of one kind on one route), so a bad proto fails at start.
    """
    by_key: dict[tuple[str, str], Route] = {}
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            where = f"{service.full_name}/{method.name}"
            if method.server_streaming:
                raise ValueError(f"{where}: server-streaming RPCs have no HTTP mapping here")
            for rule in _rules(options.Extensions[annotations_pb2.http]):
                binding = _binding(method, rule, where)
                key = (binding.verb, binding.template)
                route = by_key.setdefault(key, Route(binding.verb, binding.template))
                slot = "stream" if binding.streaming else "unary"
                if getattr(route, slot) is not None:
                    raise ValueError(f"{where}: {binding.verb} {binding.template} is taken")
                if route.bindings and route.bindings[0].body != binding.body:
                    raise ValueError(f"{where}: RPCs of one route must share its body rule")
                setattr(route, slot, binding)
    return list(by_key.values())


def _binding(method: MethodDescriptor, rule: http_pb2.HttpRule, where: str) -> Binding:
    verb = rule.WhichOneof("pattern")
    if verb not in VERBS:
        raise ValueError(f"{where}: HTTP pattern {verb!r} is not supported; use {VERBS}")
    template = getattr(rule, verb)
    _check_template(template, where)
    for name in template_variables(template):
        leaf = _field_path(method.input_type, name.split("."))
        if leaf is None or leaf.type == FieldDescriptor.TYPE_MESSAGE or is_repeated(leaf):
            raise ValueError(f"{where}: path variable {{{name}}} is not a scalar request field")
    if rule.body not in ("", "*") and rule.body not in method.input_type.fields_by_name:
        raise ValueError(f"{where}: body {rule.body!r} is not a request field")
    if verb in ("get", "delete") and rule.body:
        raise ValueError(f"{where}: {verb.upper()} takes no body")
    if method.client_streaming and rule.body != "*":
        raise ValueError(f'{where}: a client-streaming RPC needs body: "*"')
    return Binding(method, verb.upper(), template, rule.body)


def _field_path(message: Descriptor, parts: Sequence[str]) -> FieldDescriptor | None:
    descriptor: Descriptor | None = message
    leaf = None
    for part in parts:
        if descriptor is None:
            return None
        leaf = descriptor.fields_by_name.get(part)
        if leaf is None:
            return None
        descriptor = leaf.message_type
    return leaf


def is_repeated(field_descriptor: FieldDescriptor) -> bool:
    repeated = getattr(field_descriptor, "is_repeated", None)  # protobuf 6.31+
    if repeated is None:
        return bool(field_descriptor.label == FieldDescriptor.LABEL_REPEATED)
    return bool(repeated)


def _is_leaf_message(descriptor: Descriptor) -> bool:
    """Well-known types (Timestamp, Duration, wrappers, Struct) are written as JSON scalars."""
    return descriptor.full_name.startswith("google.protobuf.")


def _by_json_or_proto_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    found = descriptor.fields_by_name.get(name)
    if found is not None:
        return found
    return next((f for f in descriptor.fields if f.json_name == name), None)


def _check_shape(value: Any, descriptor: Descriptor, path: str) -> None:
    """Unknown fields and non-object messages, named by their path in proto names (the
    json_format messages name json names and the Python error instead)."""
    if not isinstance(value, dict):
        raise BadRequest(f"{path or 'body'}: expected a JSON object, got {_kind(value)}")
    for key, item in value.items():
        found = _by_json_or_proto_name(descriptor, key)
        where = f"{path}.{key}" if path else key
        if found is None:
            known = ", ".join(f.name for f in descriptor.fields)
            raise BadRequest(
                f"{where}: unknown field; {descriptor.full_name} has the fields {known}"
            )
        child = found.message_type
        if child is None or _is_leaf_message(child) or item is None:
            continue
        if child.GetOptions().map_entry:
            continue
        if is_repeated(found):
            if not isinstance(item, list):
                raise BadRequest(f"{where}: expected a JSON array, got {_kind(item)}")
            for index, element in enumerate(item):
                _check_shape(element, child, f"{where}[{index}]")
        else:
            _check_shape(item, child, where)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "null" if value is None else "an object"


_PARSE_PREFIX = re.compile(r"^Failed to parse (\w+) field: ")
_PARSE_SUFFIX = re.compile(r"\s+at [\w.\[\]]+\.*$")


def readable_parse_error(error: json_format.ParseError) -> str:
    """``reading.usage_kwh: Couldn't parse float: abc`` from json_format's nested wording."""
    text = str(error).strip()
    names = []
    while match := _PARSE_PREFIX.match(text):
        names.append(match.group(1))
        text = text[match.end() :]
    text = _PARSE_SUFFIX.sub("", text).rstrip(".")
    if "timestamp" in text.lower():
        text += "; use RFC 3339 with a zone, e.g. 2026-10-01T10:15:00Z"
    return f"{'.'.join(names)}: {text}" if names else text


def parse_message(values: Any, message_class: type[Message], where: str = "") -> Message:
    """``values`` (decoded JSON) as a ``message_class``, or ``BadRequest`` with the field."""
    _check_shape(values, message_class.DESCRIPTOR, where)
    try:
        return json_format.ParseDict(values, message_class())
    except json_format.ParseError as error:
        message = readable_parse_error(error)
        raise BadRequest(f"{where}.{message}" if where else message) from None


def _set_path(values: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    for part in parts[:-1]:
        child = values.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadRequest(f"{part}: expected a JSON object")
        values = child
    values[parts[-1]] = value


def _query_value(leaf: FieldDescriptor, text: str) -> Any:
    """A query string value as the JSON value json_format expects for ``leaf``."""
    if leaf.type == FieldDescriptor.TYPE_BOOL:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise BadRequest(f"{leaf.name}: {text!r} is not a boolean; use true or false")
        return lowered in ("true", "1")
    return text  # json_format parses numbers, enums and well-known types from strings


def build_request(
    binding: Binding,
    path_params: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: Any = None,
) -> Message:
    """The RPC's request from the path variables, the query parameters and the body
    (decoded JSON; ignored unless the binding takes one)."""
    values: dict[str, Any] = {}
    if binding.body == "*":
        if not isinstance(body, dict):
            raise BadRequest(f"body: expected a JSON object, got {_kind(body)}")
        values = dict(body)
    elif binding.body:
        values[binding.body] = body
    if query:
        allowed = {f.name: f for f in binding.query_fields()}
        grouped: dict[str, list[str]] = {}
        for key, value in query:
            grouped.setdefault(key, []).append(value)
        for key, texts in grouped.items():
            parts = key.split(".")
            leaf = _field_path(binding.method.input_type, parts) if parts[0] in allowed else None
            if leaf is None or (
                leaf.message_type is not None and not _is_leaf_message(leaf.message_type)
            ):
                names = ", ".join(allowed) or "none"
                raise BadRequest(
                    f"query parameter {key!r} is not a field of this route "
                    f"({binding.verb} {binding.template}); it takes: {names}"
                )
            converted = [_query_value(leaf, text) for text in texts]
            if not is_repeated(leaf) and len(converted) > 1:
                raise BadRequest(f"query parameter {key!r} given {len(converted)} times; once")
            _set_path(values, parts, converted if is_repeated(leaf) else converted[0])
    for name in binding.variables:
        _set_path(values, name.split("."), path_params[name])
    return parse_message(values, binding.request_class())
