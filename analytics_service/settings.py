"""Settings of analytics_service, from ANALYTICS_* and the shared variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import BrokerSettings, Port
from common.tls import InternalClientTlsSettings


class AnalyticsSettings(BrokerSettings, InternalClientTlsSettings):
    """Consumes analytics.readings; /metrics on :9100."""

    model_config = SettingsConfigDict(env_prefix="ANALYTICS_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    metrics_port: Port = 9100
    # Messages in flight (up to 128,000 readings, about 19 MB of bodies, with messages of
    # the gateway's 500); a batch counts readings, is counted in memory and acked at once.
    prefetch: int = Field(256, ge=1, le=10_000, description="unacked messages in flight")
    batch_size: int = Field(5000, ge=1, le=100_000, description="readings acked together")
    batch_linger_s: float = Field(
        0.05, ge=0, le=10, description="gather deliveries this long, then ack them at once"
    )
    # The tariff catalog and the devices' latest readings come from billing's API too:
    # analytics reads no store of billing's.
    billing_addr: str = Field("127.0.0.1:50053", min_length=3, description="billing's read API")
    billing_timeout_s: float = Field(10.0, gt=0, description="deadline of each call to billing")
    active_window_s: float = Field(900.0, gt=0, description="a device is active this long")
    silent_after_s: float = Field(3600.0, gt=0, description="and silent after this long")
    top_n: int = Field(10, ge=1, le=100, description="devices in energy_top_consumer_kwh")
    dedupe_window_s: float = Field(3600.0, gt=0, description="a resent reading counts once")
    dedupe_max_ids: int = Field(500_000, ge=1, description="reading ids remembered at most")
    billed_refresh_s: float = Field(60.0, gt=0, description="ask billing for bills this often")
    catalog_refresh_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
