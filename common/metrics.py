"""Prometheus exposition and the gRPC server metrics every service shares."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram, disable_created_metrics, start_http_server

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_LATENCY = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to sending its status.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS_S,
)


GRPC_CLIENT_HANDLED = Counter(
    "grpc_client_handled_total",
    "RPCs completed by this service as a client, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_CLIENT_LATENCY = Histogram(
    "grpc_client_handling_seconds",
    "Time from starting an RPC to receiving its status, as a client.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS_S,
)


# How late the event loop runs a timer due every EVENT_LOOP_PROBE_S: the wait every callback,
# RPC and message had at that moment, because a callback held the loop (blocking code, a
# garbage collection) or the process got no core.
EVENT_LOOP_PROBE_S = 0.1
EVENT_LOOP_LAG = Histogram(
    "event_loop_lag_seconds",
    f"How late the event loop ran a timer due every {EVENT_LOOP_PROBE_S:g} s: the wait every "
    "callback, RPC and message had then (a blocked loop, a collection, no free core).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


async def watch_event_loop_lag(interval_s: float = EVENT_LOOP_PROBE_S) -> None:
    """Observe ``event_loop_lag_seconds`` every ``interval_s`` until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))


def observe_times(histogram: Histogram, amount: float, times: int) -> None:
    """``histogram.observe(amount)`` ``times`` times over, in one step: a batch's readings
    share their interval ends, hence their lag, and an observe per reading was a tenth of a
    consumer's CPU. prometheus_client has no weighted observe; this uses its histogram's
    own buckets and sum (a unit test holds it to ``observe``'s exposition)."""
    histogram._sum.inc(amount * times)
    histogram._buckets[bisect.bisect_left(histogram._upper_bounds, amount)].inc(times)


def serve_metrics(host: str, port: int) -> int:
    """Expose /metrics over HTTP in a background thread; returns the bound port."""
    disable_created_metrics()  # the *_created series only double the exposition
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Count and time every unary and client-streaming RPC by method and status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _measured(handler.unary_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _measured(handler.stream_unary, service, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # server-streaming health Watch and reflection: not measured


def _measured(behaviour: Callable[..., Any], service: str, method: str) -> Callable[..., Any]:
    async def wrapper(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = await behaviour(request_or_iterator, context)
            code = context.code() or grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            GRPC_HANDLED.labels(service, method, _code_name(code)).inc()
            GRPC_LATENCY.labels(service, method).observe(time.perf_counter() - started)

    return wrapper


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # context.code() can answer the raw cygrpc integer
        return next(c.name for c in grpc.StatusCode if c.value[0] == code)
    except StopIteration:
        return str(code)


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Count and time every unary call a service makes, by method and status code."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[grpc.aio.Call]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.Call:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        service, _, method_name = name.strip("/").rpartition("/")
        started = time.perf_counter()
        call = await continuation(client_call_details, request)
        code = await call.code()  # waits for the status without raising
        GRPC_CLIENT_HANDLED.labels(service, method_name, _code_name(code)).inc()
        GRPC_CLIENT_LATENCY.labels(service, method_name).observe(time.perf_counter() - started)
        return call
