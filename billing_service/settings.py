"""Settings of billing_service, from BILLING_* and the shared variables."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import BrokerSettings, Port
from common.tls import ServerTlsSettings


class BillingSettings(BrokerSettings, ServerTlsSettings):
    """Consumes billing.readings; answers the read API (gRPC) on :50053, /metrics on :9103."""

    model_config = SettingsConfigDict(env_prefix="BILLING_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: Port = 50053
    metrics_port: Port = 9103
    mongodb_url: str = Field(
        "mongodb://127.0.0.1:27017/", pattern="^mongodb(\\+srv)?://", validation_alias="MONGODB_URL"
    )
    mongodb_database: str = Field(
        "energy", pattern="^[A-Za-z0-9_-]{1,63}$", validation_alias="MONGODB_DATABASE"
    )
    mongodb_timeout_s: float = Field(5.0, gt=0, description="server selection and socket timeout")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", pattern="^rediss?://", validation_alias="REDIS_URL"
    )
    redis_key_prefix: str = Field("energy:", validation_alias="REDIS_KEY_PREFIX")
    redis_timeout_s: float = Field(2.0, gt=0)
    # The prefetch counts messages (the broker's unit), the batch readings: a message holds
    # one reading or up to the gateway's batch (500). 200 messages keep two batches ahead
    # once messages hold 25 readings or more, and bound what billing holds (and a crash
    # hands back) to 100,000 readings, about 15 MB of bodies; single-reading messages (an
    # old publisher) are billed in batches of 200 (README, Broker messages).
    prefetch: int = Field(200, ge=1, le=10_000, description="unacked messages in flight")
    batch_size: int = Field(
        2500, ge=1, le=10_000, description="readings billed together (a message is not split)"
    )
    batch_linger_s: float = Field(
        0.05, ge=0, le=10, description="wait this long after a delivery for a fuller batch"
    )
    retry_max_delay_s: float = Field(30.0, gt=0, description="cap of the backoff on MongoDB errors")
    cache_retry_s: float = Field(
        5.0, ge=0, description="retry a Redis update this long before deferring it"
    )
    max_usage_buckets: int = Field(10_000, ge=1, description="windows one usage query may return")
    catalog_refresh_s: float = Field(10.0, gt=0, description="reload the tariff catalog this often")
    close_grace_hours: float = Field(
        72,
        ge=0,
        le=24 * 366,
        description="a period closes (its bills are issued) this long after it ends",
    )
    close_check_interval_s: float = Field(
        300,
        ge=0,
        description="look for periods to close this often; 0: only `make close-period` closes",
    )
    faults_file: str = Field(
        "", description="testing aid: while this file exists, MongoDB writes fail (tests/faults)"
    )
    shutdown_grace_s: float = Field(10.0, ge=0)
