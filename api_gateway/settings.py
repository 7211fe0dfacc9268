"""Settings of api_gateway, from GATEWAY_* and the shared variables."""

from typing import Self

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from api_gateway.ratelimit import RateLimits
from common.settings import Port, ServiceSettings
from common.tls import InternalClientTlsSettings, ServerTlsSettings


class GatewaySettings(ServiceSettings, ServerTlsSettings, InternalClientTlsSettings):
    """Public gRPC on :50051, HTTP/JSON on :8080, /metrics on :9101."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: Port = 50051
    metrics_port: Port = 9101
    # The HTTP/JSON API (the Gateway RPCs' google.api.http routes), OpenAPI and the web page.
    http_port: Port = Field(8080, description="HTTP/JSON API and web page; 0: any free port")
    http_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="larger bodies get 413"
    )
    http_timeout_s: float = Field(60.0, gt=0, description="deadline of each transcoded call")
    ingestion_addr: str = Field("127.0.0.1:50052", min_length=3, description="host:port")
    ingestion_timeout_s: float = Field(5.0, gt=0, description="deadline of each forward call")
    billing_addr: str = Field("127.0.0.1:50053", min_length=3, description="host:port")
    billing_timeout_s: float = Field(10.0, gt=0, description="deadline of each read call")
    batch_size: int = Field(
        500, ge=1, le=10_000, description="readings forwarded per call (streams and SendReading)"
    )
    # SendReading calls are gathered into publishes (api_gateway.batcher); this many may
    # wait for their confirms at once while the next calls gather. One gave the most calls/s
    # (ghz c=64, interleaved runs on a loaded 2-core machine: 679-991 with one, 563-764 with
    # two, 475 with four) and the largest batches: a second slot mostly carries lone calls.
    unary_batches_in_flight: int = Field(
        1, ge=1, le=64, description="SendReading batches waiting for confirms at once"
    )
    max_message_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest request accepted (not answers)"
    )
    max_reported_rejections: int = Field(1000, ge=0, description="rejections listed per stream")
    shutdown_grace_s: float = Field(10.0, ge=0)

    # Credentials (device tokens in MongoDB; the admin token from the environment).
    auth_enabled: bool = Field(True, description="false only for local experiments")
    admin_token: SecretStr | None = Field(
        None, min_length=16, description="manages devices; may send and read for any device"
    )
    auth_cache_ttl_s: float = Field(5.0, ge=0, description="how long a token lookup is reused")
    mongodb_url: str = Field(
        "mongodb://127.0.0.1:27017/", pattern="^mongodb(\\+srv)?://", validation_alias="MONGODB_URL"
    )
    mongodb_database: str = Field(
        "energy", pattern="^[A-Za-z0-9_-]{1,63}$", validation_alias="MONGODB_DATABASE"
    )
    mongodb_timeout_s: float = Field(2.0, gt=0, description="deadline of each credential lookup")

    # Rate limits: token buckets in Redis, shared by every gateway replica.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", pattern="^rediss?://", validation_alias="REDIS_URL"
    )
    redis_key_prefix: str = Field("energy:", validation_alias="REDIS_KEY_PREFIX")
    rate_limit_timeout_s: float = Field(0.5, gt=0, description="then the limiter lets readings in")
    device_rate_per_s: float = Field(10.0, ge=0, description="readings/s per device; 0: no limit")
    device_burst: int = Field(1000, ge=1, description="readings a device may send at once")
    global_rate_per_s: float = Field(20_000.0, ge=0, description="readings/s in all; 0: no limit")
    global_burst: int = Field(40_000, ge=1)
    # Reads cost billing CPU (a bill: tens to hundreds of ms); a web page's load makes ~6.
    read_rate_per_s: float = Field(
        5.0, ge=0, description="read calls/s per device or account token; 0: no limit"
    )
    read_burst: int = Field(50, ge=1, description="read calls a token may make at once")
    # About what one billing process answers: a 15-minute meter's open bill took 4-16 ms of
    # it here (python -m scripts.bench bills), so 60-250 a second.
    global_read_rate_per_s: float = Field(
        200.0, ge=0, description="read calls/s of every device and account token; 0: no limit"
    )
    global_read_burst: int = Field(400, ge=1, description="read calls all tokens may make at once")

    # Limits on connections and streams.
    max_stream_readings: int = Field(100_000, ge=1, description="readings one stream may carry")
    max_concurrent_rpcs: int = Field(1000, ge=1, description="then RESOURCE_EXHAUSTED")
    # At 100, grpc refused ~2% of streams (REFUSED_STREAM) with only 64 calls in flight on
    # one connection (make bench, ghz -c 64); at 1000 none.
    max_concurrent_streams: int = Field(1000, ge=1, description="HTTP/2 streams per connection")

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        ports = {"GATEWAY_PORT": self.port, "GATEWAY_METRICS_PORT": self.metrics_port}
        for name, port in ports.items():
            if port and port == self.http_port:
                raise ValueError(f"GATEWAY_HTTP_PORT ({port}) must differ from {name}")
        return self

    @model_validator(mode="after")
    def _auth_needs_admin_token(self) -> Self:
        if self.auth_enabled and self.admin_token is None:
            raise ValueError(
                "GATEWAY_ADMIN_TOKEN is required while GATEWAY_AUTH_ENABLED is true: set it to a "
                "random secret of 16+ characters (e.g. `openssl rand -hex 32`)"
            )
        for name, rate, burst in (
            ("GATEWAY_DEVICE_BURST", self.device_rate_per_s, self.device_burst),
            ("GATEWAY_GLOBAL_BURST", self.global_rate_per_s, self.global_burst),
        ):
            if rate > 0 and burst < self.batch_size:
                raise ValueError(
                    f"{name} ({burst}) must be at least GATEWAY_BATCH_SIZE ({self.batch_size}), "
                    "or a full batch could never pass"
                )
        return self

    @property
    def rate_limits(self) -> RateLimits:
        return RateLimits(
            device_rate_per_s=self.device_rate_per_s,
            device_burst=self.device_burst,
            global_rate_per_s=self.global_rate_per_s,
            global_burst=self.global_burst,
            read_rate_per_s=self.read_rate_per_s,
            read_burst=self.read_burst,
            global_read_rate_per_s=self.global_read_rate_per_s,
            global_read_burst=self.global_read_burst,
        )
