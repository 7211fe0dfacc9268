"""Settings of analytics_service, from ANALYTICS_* and the shared variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import BrokerSettings, Port


class AnalyticsSettings(BrokerSettings):
    """Consumes analytics.readings; /metrics on :9100."""

    model_config = SettingsConfigDict(env_prefix="ANALYTICS_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    metrics_port: Port = 9100
    prefetch: int = Field(256, ge=1, le=10_000)
    active_window_s: float = Field(900.0, gt=0, description="a device is active this long")
    dedupe_window_s: float = Field(3600.0, gt=0, description="a resent reading counts once")
    dedupe_max_ids: int = Field(500_000, ge=1, description="reading ids remembered at most")
    shutdown_grace_s: float = Field(10.0, ge=0)
