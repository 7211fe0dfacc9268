"""Credentials: tokens, their hashes, and who a request's token says it is.

A token is ``et1.<key_id>.<secret>``: the key id finds the stored credential, the
secret (32 random bytes) is checked against its SHA-256 with a constant-time compare. A
plain hash is enough because the secret is random, not a password: there is nothing to
guess. Only the hash is stored, so a database leak reveals no token.

A credential is of a kind: a device token sends and reads its own device's data; an
account token is read-only and reads its account's bills and the devices billing's
catalog bills to the account. The admin token (``GATEWAY_ADMIN_TOKEN``) manages tokens
and may send or read for any device (bulk import, backfill, dashboards).

No I/O here: the store of credentials is passed in (``CredentialStore``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

import grpc

TOKEN_PREFIX = "et1"  # marks the format, so a leaked token is recognisable in a scan


class TokenKind(StrEnum):
    """What a token speaks for; stored with its credential."""

    DEVICE = "device"
    ACCOUNT = "account"


# The DeviceAdmin RPC that gives a subject of each kind a new token.
ROTATE_RPC = {TokenKind.DEVICE: "RotateDeviceToken", TokenKind.ACCOUNT: "RotateAccountToken"}


@dataclass(frozen=True)
class Subject:
    """What a token speaks for: a device or an account, by id."""

    kind: TokenKind
    id: str

    @property
    def description(self) -> str:
        return f"{self.kind} {self.id!r}"


@dataclass(frozen=True)
class Credential:
    subject: Subject
    key_id: str
    secret_sha256: str
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Principal:
    """Who is calling: a device (``device_id``), an account (``account_id``, read-only),
    the admin, or anyone (auth switched off)."""

    device_id: str | None = None
    account_id: str | None = None
    admin: bool = False
    unchecked: bool = False

    def may_act_for(self, device_id: str) -> bool:
        """May send for the device (an account token never does), or read it without asking
        which account it belongs to."""
        return self.admin or self.unchecked or self.device_id == device_id

    @property
    def read_only(self) -> bool:
        return self.account_id is not None

    @property
    def kind(self) -> str:
        """For metric labels: admin, account, device or anyone."""
        if self.admin:
            return "admin"
        if self.account_id is not None:
            return TokenKind.ACCOUNT.value
        return TokenKind.DEVICE.value if self.device_id is not None else "anyone"

    @property
    def description(self) -> str:
        if self.admin:
            return "the admin token"
        if self.account_id is not None:
            return f"the token of account {self.account_id!r}"
        return f"the token of device {self.device_id!r}"


ADMIN = Principal(admin=True)
ANYONE = Principal(unchecked=True)  # GATEWAY_AUTH_ENABLED=false


class AuthError(Exception):
    """Refused: ``code`` is UNAUTHENTICATED or PERMISSION_DENIED; the message says why.
    ``token`` is the kind of the refused token when known (a metric label), else unknown."""

    def __init__(self, code: grpc.StatusCode, message: str, token: str = "unknown") -> None:
        super().__init__(message)
        self.code = code
        self.token = token


class CredentialStore(Protocol):
    async def find(self, key_id: str) -> Credential | None: ...


@dataclass(frozen=True)
class IssuedToken:
    token: str
    credential: Credential


def issue_token(subject: Subject) -> IssuedToken:
    """A new random token for ``subject`` and the credential that stores only its hash."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    credential = Credential(subject=subject, key_id=key_id, secret_sha256=_sha256(secret))
    return IssuedToken(token=f"{TOKEN_PREFIX}.{key_id}.{secret}", credential=credential)


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header, or raise UNAUTHENTICATED."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "no credentials: send 'authorization: Bearer <device token>' as gRPC metadata "
            "or an HTTP header (register the device with DeviceAdmin/RegisterDevice to get one)",
        )
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(
            grpc.StatusCode.UNAUTHENTICATED,
            "malformed authorization metadata: expected 'Bearer <token>'",
        )
    return token.strip()


class Authenticator:
    """Turns a bearer token into a Principal; never logs or echoes the token."""

    def __init__(self, store: CredentialStore, admin_token: str | None) -> None:
        self._store = store
        self._admin_sha256 = _sha256(admin_token) if admin_token else None

    async def principal(self, token: str) -> Principal:
        if self._admin_sha256 is not None and hmac.compare_digest(
            _sha256(token), self._admin_sha256
        ):
            return ADMIN
        prefix, _, rest = token.partition(".")
        key_id, _, secret = rest.partition(".")
        if prefix != TOKEN_PREFIX or not key_id or not secret:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        credential = await self._store.find(key_id)
        # Compare even when nothing was found, so timing does not tell the two apart.
        expected = credential.secret_sha256 if credential else _sha256(key_id)
        if not hmac.compare_digest(_sha256(secret), expected) or credential is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        subject = credential.subject
        if credential.revoked_at is not None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the token of {subject.description} was revoked; ask the operator "
                f"for a new one (DeviceAdmin/{ROTATE_RPC[subject.kind]})",
                token=subject.kind.value,
            )
        if subject.kind == TokenKind.ACCOUNT:
            return Principal(account_id=subject.id)
        return Principal(device_id=subject.id)

    def require_admin(self, token: str) -> None:
        if self._admin_sha256 is None:
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED,
                "device administration is disabled: start the gateway with GATEWAY_ADMIN_TOKEN",
            )
        if not hmac.compare_digest(_sha256(token), self._admin_sha256):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, "this call needs the admin token")


def require_sender(principal: Principal) -> None:
    """Account tokens are read-only: they send no readings."""
    if principal.read_only:
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"account tokens are read-only: {principal.description} may not send readings; "
            "send them with the device's own token",
            token=principal.kind,
        )


def require_device(principal: Principal, device_id: str) -> None:
    """A device token authorizes only its own device's readings and data (an account
    token's reads are decided with the catalog: ``api_gateway.guard``)."""
    if not principal.may_act_for(device_id):
        raise AuthError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{principal.description} may not act for device {device_id!r}",
            token=principal.kind,
        )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
