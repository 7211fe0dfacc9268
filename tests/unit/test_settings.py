"""Settings: documented defaults, and a bad value is reported by its variable's name."""

from __future__ import annotations

import pytest

from analytics_service.settings import AnalyticsSettings
from api_gateway.settings import GatewaySettings
from billing_service.settings import BillingSettings
from common.settings import env_names, load_settings
from ingestion_service.settings import IngestionSettings


def test_defaults_are_the_documented_ports() -> None:
    gateway = GatewaySettings(admin_token="x" * 16)
    assert (gateway.port, gateway.metrics_port) == (50051, 9101)
    assert (IngestionSettings().port, IngestionSettings().metrics_port) == (50052, 9102)
    assert (BillingSettings().port, BillingSettings().metrics_port) == (50053, 9103)
    assert AnalyticsSettings().metrics_port == 9100


def test_prefixed_and_shared_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_PREFETCH", "7")
    monkeypatch.setenv("MONGODB_URL", "mongodb://db:27017/")
    monkeypatch.setenv("READING_MAX_USAGE_KWH", "42")
    settings = BillingSettings()
    assert settings.prefetch == 7
    assert settings.mongodb_url == "mongodb://db:27017/"
    assert settings.limits.max_usage_kwh == 42


def test_env_names_lists_every_variable() -> None:
    names = env_names(GatewaySettings)
    assert {"GATEWAY_PORT", "GATEWAY_INGESTION_ADDR", "LOG_LEVEL", "READING_MAX_USAGE_KWH"} <= set(
        names
    )


@pytest.mark.parametrize(
    ("variable", "value", "settings_class"),
    [
        ("GATEWAY_PORT", "fifty", GatewaySettings),
        ("GATEWAY_PORT", "70000", GatewaySettings),
        ("RABBITMQ_URL", "http://rabbit", IngestionSettings),
        ("MONGODB_URL", "postgres://x", BillingSettings),
        ("LOG_LEVEL", "LOUD", AnalyticsSettings),
        ("BILLING_PREFETCH", "0", BillingSettings),
    ],
)
def test_a_bad_value_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, settings_class: type
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as caught:
        load_settings(settings_class)
    message = str(caught.value.code)
    assert f"{variable}={value!r}" in message


def test_auth_is_on_by_default_and_needs_the_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as stopped:
        load_settings(GatewaySettings)
    assert "GATEWAY_ADMIN_TOKEN is required while GATEWAY_AUTH_ENABLED is true" in str(
        stopped.value
    )
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "short")
    with pytest.raises(SystemExit) as stopped:
        load_settings(GatewaySettings)
    assert "GATEWAY_ADMIN_TOKEN" in str(stopped.value) and "short" not in str(stopped.value)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "a-long-enough-secret")
    settings = load_settings(GatewaySettings)
    assert settings.auth_enabled and "a-long-enough-secret" not in repr(settings)
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN")
    monkeypatch.setenv("GATEWAY_AUTH_ENABLED", "false")
    assert load_settings(GatewaySettings).auth_enabled is False


def test_a_burst_smaller_than_a_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="GATEWAY_DEVICE_BURST"):
        GatewaySettings(admin_token="x" * 16, device_burst=100, batch_size=500)
    GatewaySettings(admin_token="x" * 16, device_burst=100, batch_size=500, device_rate_per_s=0)


def test_reads_are_limited_per_token_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = GatewaySettings(admin_token="x" * 16).rate_limits
    assert (limits.read_rate_per_s, limits.read_burst) == (5.0, 50)
    assert (limits.global_read_rate_per_s, limits.global_read_burst) == (200.0, 400)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "x" * 16)
    monkeypatch.setenv("GATEWAY_READ_RATE_PER_S", "0")  # no limit
    monkeypatch.setenv("GATEWAY_READ_BURST", "3")
    limits = load_settings(GatewaySettings).rate_limits
    assert (limits.read_rate_per_s, limits.read_burst) == (0, 3)
    monkeypatch.setenv("GATEWAY_GLOBAL_READ_RATE_PER_S", "50")
    monkeypatch.setenv("GATEWAY_GLOBAL_READ_BURST", "60")
    limits = load_settings(GatewaySettings).rate_limits
    assert (limits.global_read_rate_per_s, limits.global_read_burst) == (50, 60)
    for variable, value in (
        ("GATEWAY_READ_BURST", "0"),
        ("GATEWAY_READ_RATE_PER_S", "-1"),
        ("GATEWAY_GLOBAL_READ_BURST", "0"),
        ("GATEWAY_GLOBAL_READ_RATE_PER_S", "-1"),
    ):
        with monkeypatch.context() as bad, pytest.raises(SystemExit) as stopped:
            bad.setenv(variable, value)
            load_settings(GatewaySettings)
        assert f"{variable}={value!r}" in str(stopped.value.code)


def test_a_billing_batch_of_readings_may_exceed_the_prefetch_of_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch counts readings and the prefetch messages, which hold up to 500 each."""
    monkeypatch.setenv("BILLING_BATCH_SIZE", "6000")
    settings = load_settings(BillingSettings)
    assert (settings.batch_size, settings.prefetch) == (6000, 200)
