"""Account tokens without a network: the credential's kind, the principal, the refusals, and
the gateway's bounded, expiring cache of billing's device → account answers."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from api_gateway.adapters.billing import DeviceAccounts
from api_gateway.auth import (
    Authenticator,
    AuthError,
    Credential,
    Principal,
    Subject,
    TokenKind,
    issue_token,
    require_device,
    require_sender,
)
from common.energy.v1 import billing_pb2


class Store:
    def __init__(self, *credentials: Credential) -> None:
        self.by_key = {credential.key_id: credential for credential in credentials}

    async def find(self, key_id: str) -> Credential | None:
        return self.by_key.get(key_id)


async def test_an_account_credential_makes_a_read_only_account_principal() -> None:
    issued = issue_token(Subject(TokenKind.ACCOUNT, "acme"))
    assert issued.credential.subject.id not in issued.token  # the key id finds it
    principal = await Authenticator(Store(issued.credential), "admin").principal(issued.token)
    assert principal == Principal(account_id="acme")
    assert principal.read_only and principal.kind == "account"
    assert not principal.may_act_for("meter-1")
    with pytest.raises(AuthError) as caught:
        require_sender(principal)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.token == "account"
    assert str(caught.value).startswith("account tokens are read-only")
    with pytest.raises(AuthError):
        require_device(principal, "meter-1")


async def test_a_device_credential_still_makes_a_device_principal() -> None:
    issued = issue_token(Subject(TokenKind.DEVICE, "meter-1"))
    principal = await Authenticator(Store(issued.credential), None).principal(issued.token)
    assert principal == Principal(device_id="meter-1") and not principal.read_only
    require_sender(principal)
    require_device(principal, "meter-1")


class Billing:
    """Answers GetDeviceAccount from a dict and counts the calls."""

    def __init__(self, accounts: dict[str, str]) -> None:
        self.accounts = accounts
        self.calls = 0

    async def call(self, method: str, request: Any) -> Any:
        assert method == "GetDeviceAccount"
        self.calls += 1
        return billing_pb2.GetDeviceAccountResponse(
            device_id=request.device_id, account_id=self.accounts.get(request.device_id, "")
        )


async def test_device_accounts_are_cached_for_the_ttl_and_bounded() -> None:
    billing = Billing({"meter-1": "acme"})
    accounts = DeviceAccounts(billing, cache_ttl_s=60, max_devices=2)  # type: ignore[arg-type]
    assert await accounts.account_of("meter-1") == "acme"
    assert await accounts.account_of("stray") == ""  # listed by no account: cached too
    billing.accounts["meter-1"] = "globex"  # a catalog change within the TTL is not seen
    assert await accounts.account_of("meter-1") == "acme"
    assert billing.calls == 2
    await accounts.account_of("meter-2")  # a third device evicts one of the two
    assert len(accounts._cache) == 2

    expiring = DeviceAccounts(billing, cache_ttl_s=0)  # type: ignore[arg-type]
    assert await expiring.account_of("meter-1") == "globex"
    assert await expiring.account_of("meter-1") == "globex"
    assert billing.calls == 5
