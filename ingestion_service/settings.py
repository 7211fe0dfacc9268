"""Settings of ingestion_service, from INGESTION_* and the shared variables."""

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.messages import SCHEMA_VERSIONS
from common.settings import BrokerSettings, Port
from common.tls import ServerTlsSettings
from ingestion_service.adapters.rabbit import DEFAULT_MAX_MESSAGE_READINGS


class IngestionSettings(BrokerSettings, ServerTlsSettings):
    """Internal gRPC on :50052, /metrics on :9102."""

    model_config = SettingsConfigDict(env_prefix="INGESTION_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: Port = 50052
    metrics_port: Port = 9102
    # Ingestion's own broker URL, when it differs from the consumers' (a publish-only user;
    # the tests' slowed proxy); RABBITMQ_URL otherwise.
    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        pattern="^amqps?://",
        validation_alias=AliasChoices("INGESTION_RABBITMQ_URL", "RABBITMQ_URL"),
    )
    confirm_timeout_s: float = Field(5.0, gt=0, description="wait this long for broker confirms")
    # Twenty of the gateway's batches of 500, each one broker message (schema 2): the bound
    # counts readings, the broker's confirm work is per message. 2,000 (four messages) was
    # chosen when every reading was a message; with packed streams it held the platform at
    # 10,000-16,000 readings/s with refusals where 10,000 gave 19,000-26,000 without any
    # (make bench, 2-core machine). On the slowest broker seen (2,000 messages/s), twenty
    # messages of about 75 KB should confirm far within the 5 s deadlines (estimated).
    max_in_flight_readings: int = Field(
        10_000,
        ge=1,
        description="readings waiting for confirms at most; beyond, RESOURCE_EXHAUSTED at once",
    )
    shutdown_grace_s: float = Field(10.0, ge=0)
    # 2: a publish's readings in one message (a batch); 1: one message per reading, as before
    # schema 2 existed, for consumers that are not upgraded yet (a rolling upgrade).
    message_schema: int = Field(2, description="broker message schema version published")
    # A publish of more readings is split into several messages, all confirmed before OK
    # (why 500: ingestion_service.adapters.rabbit).
    max_message_readings: int = Field(
        DEFAULT_MAX_MESSAGE_READINGS,
        ge=1,
        le=10_000,
        description="readings per schema-2 message at most",
    )

    @field_validator("message_schema")
    @classmethod
    def _known_schema(cls, value: int) -> int:
        if value not in SCHEMA_VERSIONS:
            raise ValueError(
                "use 2 (many readings per message, the default) or 1 (one message per "
                "reading, for consumers that do not read version 2 yet)"
            )
        return value
