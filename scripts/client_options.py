"""The options every client of the gateway takes, defined once: where the gateway is
(``--target``), the bearer token (``--token``, or ``GATEWAY_TOKEN``), and TLS (``--tls-ca``,
with ``--tls-cert`` and ``--tls-key`` for mTLS; plaintext without them).

simulate, import_csv, reconcile and the benchmarks declare their parameters with these
types and open their channel with :func:`open_channel`. The senders among them resend as a
logger does: what :func:`should_resend` accepts, after :func:`resend_delay_s`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from common.errors import retry_delay_s
from common.gateway_client import TOKEN_ENV, gateway_channel

DEFAULT_TARGET = "127.0.0.1:50051"

Target = Annotated[str, typer.Option(help="Gateway HOST:PORT.")]
Token = Annotated[
    str | None,
    typer.Option(envvar=TOKEN_ENV, help="Bearer token: a device's, or the admin one."),
]
TlsCa = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="Connect with TLS, trusting this CA (PEM)."),
]
TlsCert = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="Client certificate for mTLS (PEM)."),
]
TlsKey = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="Private key of --tls-cert (PEM)."),
]


@dataclass(frozen=True)
class ClientTls:
    """TLS to the gateway: the CA to trust and, for mTLS, a client certificate and key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


def client_tls(ca: Path | None, cert: Path | None, key: Path | None) -> ClientTls | None:
    """The TLS of ``--tls-ca/--tls-cert/--tls-key``; None (plaintext) without a CA."""
    if (cert is None) != (key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    if ca is None:
        if cert is not None:
            raise typer.BadParameter("--tls-cert needs --tls-ca: a certificate is sent over TLS")
        return None
    return ClientTls(ca, cert, key)


def open_channel(
    target: str, token: str | None, tls: ClientTls | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to the gateway at ``target``: ``token`` on every call, TLS when given."""
    return gateway_channel(target, token, options, tls.credentials() if tls else None)


# What a logger resends: the platform could not take the readings now (down, slow, or
# busy); nothing of them is billed twice, since a resent reading is the same reading. Any
# other code would fail again the same way.
RESEND_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def should_resend(error: grpc.aio.AioRpcError) -> bool:
    """True for the codes of RESEND_CODES, and when grpc's Python client lost the answer.

    A stream the server answers before it has read all of it (the gateway refuses a stream
    once its first batch is refused) reaches an asyncio client, now and then, as INTERNAL
    "Internal error from Core" from the client's own failed write instead of the server's
    status (grpc/grpc#36066; 4 to 10% of such streams with grpcio 1.85). The server's
    answer is unknown then, and resending is safe: a resent reading is the same reading.
    """
    return error.code() in RESEND_CODES or _lost_to_a_failed_write(error)


def _lost_to_a_failed_write(error: grpc.aio.AioRpcError) -> bool:
    return (
        error.code() == grpc.StatusCode.INTERNAL
        and error.details() == "Internal error from Core"
        and "SendMessageOperation" in (error.debug_error_string() or "")
    )


def resend_delay_s(error: grpc.aio.AioRpcError, backoff_s: float) -> float:
    """How long to wait before resending after ``error``: the delay the server asked for in
    a ``google.rpc.RetryInfo`` (ingestion busy), stretched at random by up to as much again
    so that callers refused together come back spread out, never earlier than asked; else
    the caller's own ``backoff_s``."""
    hint_s = retry_delay_s(error)
    return backoff_s if hint_s is None else hint_s * random.uniform(1, 2)
