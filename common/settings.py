"""Typed settings from environment variables, shared pieces and the loader.

Each service declares one ``BaseSettings`` class with its own env prefix (``GATEWAY_``,
...). Connection URLs and the reading limits are shared by every service and so are read
without a prefix (``RABBITMQ_URL``, ``READING_MAX_USAGE_KWH``). Settings are built once in
``__main__`` and passed down; nothing reads the environment at import time.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.models import Limits

Port = Annotated[int, Field(ge=0, le=65535)]
T = TypeVar("T", bound=BaseSettings)


class ServiceSettings(BaseSettings):
    """What every service reads: logging and the shared reading limits."""

    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", validation_alias="LOG_LEVEL"
    )
    log_format: Literal["json", "text"] = Field(
        "json", validation_alias="LOG_FORMAT", description="text: one readable line a record"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", validation_alias="EVENT_LOOP", description="asyncio: the standard loop"
    )
    max_usage_kwh: float = Field(
        1_000_000.0,
        gt=0,
        validation_alias="READING_MAX_USAGE_KWH",
        description="largest usage_kwh one reading may carry",
    )
    max_future_skew_s: float = Field(
        900.0,
        ge=0,
        validation_alias="READING_MAX_FUTURE_SKEW_S",
        description="how far ahead of the server clock a reading's timestamp may be",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def limits(self) -> Limits:
        return Limits(
            max_usage_kwh=self.max_usage_kwh,
            max_future_skew=timedelta(seconds=self.max_future_skew_s),
        )


class BrokerSettings(ServiceSettings):
    """Services that talk to RabbitMQ."""

    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/",
        pattern="^amqps?://",
        validation_alias="RABBITMQ_URL",
    )
    topology_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._-]*$",
        validation_alias="TOPOLOGY_PREFIX",
        description="prefix for exchange and queue names, to isolate tests on one broker",
    )


def env_names(settings_class: type[BaseSettings]) -> dict[str, str]:
    """Map each environment variable a settings class reads to its field name."""
    prefix = settings_class.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field_name, info in settings_class.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str):
            names[alias] = field_name
        elif isinstance(alias, AliasChoices):
            names.update({str(choice): field_name for choice in alias.choices})
        else:
            names[f"{prefix}{field_name}".upper()] = field_name
    return names


def load_settings(settings_class: type[T]) -> T:
    """Build settings from the environment, or exit naming each bad variable and why."""
    try:
        return settings_class()
    except ValidationError as error:
        by_field = {field: env for env, field in env_names(settings_class).items()}
        lines = [f"invalid configuration for {settings_class.__name__}:"]
        for problem in error.errors():
            if not problem["loc"]:  # a check across fields: its input is every value, secrets too
                lines.append(f"  {problem['msg']}")
                continue
            field = str(problem["loc"][0])
            variable = by_field.get(field, field.upper())
            shown = "<hidden>" if _is_secret(settings_class, field) else repr(problem.get("input"))
            lines.append(f"  {variable}={shown}: {problem['msg']}")
        sys.exit("\n".join(lines))


def _is_secret(settings_class: type[BaseSettings], field: str) -> bool:
    """Secret fields (tokens) are never echoed in a configuration error."""
    info = settings_class.model_fields.get(field)
    return info is not None and "SecretStr" in repr(info.annotation)
