"""Settings of ingestion_service, from INGESTION_* and the shared variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import BrokerSettings, Port
from common.tls import ServerTlsSettings


class IngestionSettings(BrokerSettings, ServerTlsSettings):
    """Internal gRPC on :50052, /metrics on :9102."""

    model_config = SettingsConfigDict(env_prefix="INGESTION_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: Port = 50052
    metrics_port: Port = 9102
    confirm_timeout_s: float = Field(5.0, gt=0, description="wait this long for broker confirms")
    shutdown_grace_s: float = Field(10.0, ge=0)
