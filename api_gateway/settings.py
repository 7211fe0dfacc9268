"""Settings of api_gateway, from GATEWAY_* and the shared variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import Port, ServiceSettings
from common.tls import InternalClientTlsSettings, ServerTlsSettings


class GatewaySettings(ServiceSettings, ServerTlsSettings, InternalClientTlsSettings):
    """Public gRPC on :50051, /metrics on :9101."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: Port = 50051
    metrics_port: Port = 9101
    ingestion_addr: str = Field("127.0.0.1:50052", min_length=3, description="host:port")
    ingestion_timeout_s: float = Field(5.0, gt=0, description="deadline of each forward call")
    billing_addr: str = Field("127.0.0.1:50053", min_length=3, description="host:port")
    billing_timeout_s: float = Field(10.0, gt=0, description="deadline of each read call")
    batch_size: int = Field(500, ge=1, le=10_000, description="readings forwarded per call")
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="largest request accepted")
    max_reported_rejections: int = Field(1000, ge=0, description="rejections listed per stream")
    shutdown_grace_s: float = Field(10.0, ge=0)
