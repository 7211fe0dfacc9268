"""TLS for gRPC: settings mixins, server credentials and client channels.

Plaintext stays the default (local development, tests); TLS is on when files are named.

* ``ServerTlsSettings``: a server's certificate and key (TLS), plus a client CA to
  require client certificates signed by it (mTLS).
* ``InternalClientTlsSettings``: how a service reaches the internal ones: the CA that
  signed their certificates (TLS), plus a client certificate and key to present (mTLS).

The mixins declare no ``env_prefix``: a service's settings class that inherits one reads
the fields under its own prefix (``INGESTION_TLS_CERT_FILE``, ``ANALYTICS_INTERNAL_TLS_CA_FILE``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import grpc
from pydantic import field_validator, model_validator
from pydantic_settings import BaseSettings

from common.settings import env_names


def _readable(path: Path | None) -> Path | None:
    """Fail at start-up, not at the first handshake, on a missing or unreadable file."""
    if path is not None and not (path.is_file() and os.access(path, os.R_OK)):
        raise ValueError(f"{path} is not a readable file")
    return path


def _env(settings: BaseSettings, field: str) -> str:
    """The variable that sets ``field``, so a message says what to fix."""
    by_field = {name: env for env, name in env_names(type(settings)).items()}
    return by_field.get(field, field.upper())


class ServerTlsSettings(BaseSettings):
    """TLS of a gRPC server: cert and key for TLS; with a client CA, mutual TLS."""

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None

    # Validator names differ between the two mixins: pydantic keys validators by name,
    # so a class inheriting both would otherwise keep only one of each.
    @field_validator("tls_cert_file", "tls_key_file", "tls_client_ca_file")
    @classmethod
    def _server_files_readable(cls, path: Path | None) -> Path | None:
        return _readable(path)

    @model_validator(mode="after")
    def _server_tls_complete(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            cert, key = _env(self, "tls_cert_file"), _env(self, "tls_key_file")
            raise ValueError(f"set both {cert} and {key} (TLS) or neither (plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"{_env(self, 'tls_client_ca_file')} needs {_env(self, 'tls_cert_file')} and "
                f"{_env(self, 'tls_key_file')}: client certificates are only asked for over TLS"
            )
        return self


class InternalClientTlsSettings(BaseSettings):
    """TLS towards internal services: their CA for TLS; a client cert and key for mTLS."""

    internal_tls_ca_file: Path | None = None
    internal_tls_cert_file: Path | None = None
    internal_tls_key_file: Path | None = None

    @field_validator("internal_tls_ca_file", "internal_tls_cert_file", "internal_tls_key_file")
    @classmethod
    def _client_files_readable(cls, path: Path | None) -> Path | None:
        return _readable(path)

    @model_validator(mode="after")
    def _client_tls_complete(self) -> Self:
        if (self.internal_tls_cert_file is None) != (self.internal_tls_key_file is None):
            cert = _env(self, "internal_tls_cert_file")
            key = _env(self, "internal_tls_key_file")
            raise ValueError(f"set both {cert} and {key} (mTLS) or neither")
        if self.internal_tls_cert_file is not None and self.internal_tls_ca_file is None:
            raise ValueError(
                f"{_env(self, 'internal_tls_cert_file')} needs "
                f"{_env(self, 'internal_tls_ca_file')}: a client certificate is only sent over TLS"
            )
        return self


def server_credentials(settings: ServerTlsSettings) -> grpc.ServerCredentials | None:
    """TLS (or mTLS with a client CA) credentials, or ``None`` for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    client_ca = settings.tls_client_ca_file
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def client_channel(
    address: str,
    tls: InternalClientTlsSettings | None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    options: Sequence[tuple[str, int | str]] = (),
) -> grpc.aio.Channel:
    """A channel to an internal service: TLS when a CA is configured, plaintext otherwise."""
    if tls is None or tls.internal_tls_ca_file is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    cert, key = tls.internal_tls_cert_file, tls.internal_tls_key_file
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.internal_tls_ca_file.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
