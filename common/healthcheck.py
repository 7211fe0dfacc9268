"""Container health probe: ``python -m common.healthcheck grpc HOST:PORT`` or ``http URL``.

Exits 0 when the target is healthy and 1 otherwise, printing a one-line reason on failure.
Only the standard library and grpc are imported, so the probe starts fast and does not
depend on a service's settings or its connections. Proxy variables (``http_proxy``...) are
ignored: the probe talks to the endpoint directly.

* ``grpc HOST:PORT`` calls ``grpc.health.v1.Health/Check`` for the server as a whole
  (service ``""``) and is healthy only when the answer is ``SERVING``.
* ``http URL`` is healthy when ``GET URL`` answers ``200``.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0
# A probe must reach the endpoint itself, never a proxy named by http_proxy and friends.
_GRPC_OPTIONS = [("grpc.enable_http_proxy", 0)]
_HTTP_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_grpc(target: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """Return ``None`` when ``target`` reports SERVING, else why it is not healthy."""
    try:
        with grpc.insecure_channel(target, options=_GRPC_OPTIONS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        name = code.name if code is not None else "ERROR"
        return f"grpc {target}: {name}: {details}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return f"grpc {target}: status {status}"
    return None


def check_http(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """Return ``None`` when ``GET url`` answers 200, else why it is not healthy."""
    if not url.startswith(("http://", "https://")):
        return f"http {url}: not an http(s) URL"
    try:
        with _HTTP_OPENER.open(url, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as error:
        return f"http {url}: status {error.code}"
    except (urllib.error.URLError, OSError) as error:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        return f"http {url}: {reason}"
    if status != 200:
        return f"http {url}: status {status}"
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``grpc HOST:PORT`` or ``http URL``."""
    parser = argparse.ArgumentParser(
        prog="python -m common.healthcheck", description="Probe a gRPC or HTTP endpoint."
    )
    parser.add_argument("kind", choices=["grpc", "http"], help="protocol to probe")
    parser.add_argument("target", help="HOST:PORT for grpc, a URL for http")
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help="seconds to wait (default 3)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one probe; return the process exit code (0 healthy, 1 not)."""
    args = parse_args(argv)
    check = check_grpc if args.kind == "grpc" else check_http
    reason = check(args.target, args.timeout)
    if reason is not None:
        print("unhealthy: " + " ".join(reason.split()), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
