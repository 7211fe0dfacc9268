"""The gateway's HTTP server (aiohttp): the transcoded API under /v1, the OpenAPI document,
and the web page's static files at /.

Routes come from the ``google.api.http`` annotations (``api_gateway.http.routes``); every
request is counted by route template and status, never by path (a label per device would
grow with the fleet).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import Counter, Histogram

from api_gateway.http.routes import Route, routes_of
from api_gateway.http.transcoder import Transcoder, error_response
from common.metrics import LATENCY_BUCKETS_S

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
OPENAPI_FILE = HERE / "openapi.json"
OPENAPI_PATH = "/v1/openapi.json"

HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "gateway_http_request_duration_seconds",
    "Time from receiving an HTTP request to its response, by route template.",
    ["route"],
    buckets=LATENCY_BUCKETS_S,
)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The page loads nothing from elsewhere and runs no inline script: a token in the tab's
# session storage is out of reach of injected markup.
STATIC_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# aiohttp's own refusals on /v1 paths, as grpc-gateway words them.
_HTTP_TO_GRPC = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
}


def aiohttp_path(template: str) -> tuple[str, dict[str, str]]:
    """``template`` in aiohttp's syntax, and aiohttp's variable names to field paths
    (``{a.b}`` becomes ``{a__b}``: aiohttp takes identifiers only)."""
    segments, fields = [], {}
    for segment in template.split("/"):
        if segment.startswith("{"):
            field = segment[1:-1].split("=")[0]
            name = field.replace(".", "__")
            fields[name] = field
            segment = "{" + name + "}"
        segments.append(segment)
    return "/".join(segments), fields


class HttpServer:
    """Serves the annotated RPCs of ``services`` by calling ``grpc_target`` (the gateway's
    own server), plus the OpenAPI document and the static page."""

    def __init__(
        self,
        services: Sequence[Any],
        grpc_target: str,
        max_body_bytes: int,
        timeout_s: float,
        static_dir: Path = STATIC_DIR,
        openapi_file: Path = OPENAPI_FILE,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            grpc_target,
            options=[
                # The body limit bounds a batch; its messages are each far below this.
                ("grpc.max_send_message_length", max_body_bytes + 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._static_dir = static_dir.resolve()
        self._openapi = openapi_file.read_bytes() if openapi_file.is_file() else None
        self.routes: list[Route] = routes_of(services)
        self._labels: dict[str, str] = {}
        transcoder = Transcoder(self._channel, max_body_bytes, timeout_s)
        self.app = web.Application(middlewares=[self._observe], client_max_size=max_body_bytes)
        for route in self.routes:
            path, fields = aiohttp_path(route.template)
            resource = self.app.router.add_resource(path)
            resource.add_route(route.verb, transcoder.handler(route, fields))
            self._labels[resource.canonical] = route.template
        self.app.router.add_get(OPENAPI_PATH, self._openapi_document)
        self._labels[OPENAPI_PATH] = OPENAPI_PATH
        static = self.app.router.add_get("/{file:.*}", self._static_file)
        self._labels[static.resource.canonical] = "static"  # type: ignore[union-attr]
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, shutdown_grace_s: float) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        if self._openapi is None:
            log.warning("no OpenAPI document to serve (run make openapi)")
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, give requests in progress the shutdown grace, close the channel."""
        if self._runner is not None:
            await self._runner.cleanup()
        await self._channel.close()

    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        route = self._labels.get(resource.canonical, "other") if resource else "unmatched"
        status = 500
        try:
            try:
                response = await handler(request)
            except web.HTTPException as refusal:
                if not request.path.startswith("/v1/"):
                    raise
                code = _HTTP_TO_GRPC.get(refusal.status, grpc.StatusCode.UNKNOWN)
                message = f"{refusal.reason}: {request.method} {request.path}"
                if refusal.status in (404, 405):
                    message += f"; the routes are listed in {OPENAPI_PATH}"
                allow = {"Allow": refusal.headers["Allow"]} if "Allow" in refusal.headers else {}
                response = error_response(code, message, refusal.status, allow)
            status = response.status
            return response
        except web.HTTPException as refusal:
            status = refusal.status
            raise
        except Exception:
            log.exception("HTTP request failed", extra={"route": route})
            response = error_response(grpc.StatusCode.INTERNAL, "internal error", 500)
            return response
        finally:
            method = request.method if request.method in _METHODS else "OTHER"
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)

    async def _openapi_document(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            raise web.HTTPNotFound()
        return web.Response(body=self._openapi, content_type="application/json")

    async def _static_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name.startswith("v1/"):
            raise web.HTTPNotFound()  # an API path no route matched: a JSON 404
        target = (self._static_dir / name).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_relative_to(self._static_dir) or not target.is_file():
            raise web.HTTPNotFound(text=f"no such file: /{name}\n")
        return web.FileResponse(target, headers=STATIC_HEADERS)
