"""The one configuration model shared by sidecar, flusher and operator.

Loaded from a YAML file (``--config`` / ``ANALYTICS_CONFIG``) and then overridden by the
environment (``REDIS_URL``, ``DATABASE_URL``, ``ANALYTICS_PIPELINE``). Connection strings are
only ever taken from the environment or the file, never rendered by the operator: in Kubernetes
they come from Secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Granularity = Literal["daily", "hourly", "user_daily"]
ALL_GRANULARITIES: tuple[Granularity, ...] = ("daily", "hourly", "user_daily")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_PIPELINE = "default/analytics"

# "<namespace>/<name>", both DNS-1123 labels, as in Kubernetes.
PIPELINE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

ENV_CONFIG_FILE = "ANALYTICS_CONFIG"
ENV_OVERRIDES = {"REDIS_URL": ("redis_url",), "DATABASE_URL": ("database_url",), "ANALYTICS_PIPELINE": ("pipeline",)}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the bad key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CountersConfig(_Section):
    """How live counters are kept in Redis."""

    ttl_seconds: int = Field(7 * 86400, ge=3600, le=366 * 86400, description="TTL of every live Redis bucket")
    granularities: tuple[Granularity, ...] = Field(ALL_GRANULARITIES, min_length=1)

    @field_validator("granularities")
    @classmethod
    def _unique(cls, value: tuple[Granularity, ...]) -> tuple[Granularity, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each granularity may be listed once")
        return value


class IngestConfig(_Section):
    """Limits applied by the sidecar before anything is counted (defaults after Segment's)."""

    max_event_bytes: int = Field(32 * 1024, ge=256, le=16 * 1024 * 1024)
    max_request_bytes: int = Field(500 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_batch_events: int = Field(2500, ge=1, le=100_000)
    max_name_length: int = Field(128, ge=1, le=1024)
    max_id_length: int = Field(256, ge=1, le=4096)
    max_future_seconds: int = Field(300, ge=0, le=86400)
    # None means "the counter TTL": an older event would land in a bucket that may already be gone.
    max_past_seconds: int | None = Field(None, ge=60)
    dedup_window_seconds: int = Field(86400, ge=0, le=30 * 86400, description="0 disables message_id dedup")


class ServerConfig(_Section):
    """Where the sidecar listens and how it batches Redis writes."""

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)
    group_commit_window_ms: float = Field(2.0, ge=0, le=1000)
    group_commit_max_events: int = Field(5000, ge=1, le=1_000_000)
    redis_timeout_seconds: float = Field(2.0, gt=0, le=60)
    retry_after_seconds: int = Field(1, ge=1, le=3600)
    shutdown_timeout_seconds: float = Field(20.0, gt=0, le=600)


class FlushConfig(_Section):
    """How the flusher moves counters into PostgreSQL."""

    batch_size: int = Field(1000, ge=1, le=1_000_000, description="buckets claimed per transaction")
    retention_days: int = Field(400, ge=1, le=36500)
    # Short, and extended every ttl/3 while a run lasts: a killed flusher blocks the next run briefly.
    lock_ttl_seconds: int = Field(60, ge=5, le=86400)
    statement_timeout_seconds: float = Field(60.0, gt=0, le=3600)


class Config(_Section):
    """Everything one pipeline's components need to know."""

    pipeline: str = DEFAULT_PIPELINE
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    counters: CountersConfig = CountersConfig()
    ingest: IngestConfig = IngestConfig()
    server: ServerConfig = ServerConfig()
    flush: FlushConfig = FlushConfig()

    @field_validator("pipeline")
    @classmethod
    def _pipeline_name(cls, value: str) -> str:
        if "/" not in value:
            value = f"default/{value}"
        if not PIPELINE_RE.match(value):
            raise ValueError(
                "must be '<namespace>/<name>' in lower-case letters, digits and '-' (e.g. 'default/web')"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("database_url")
    @classmethod
    def _pg_scheme(cls, value: str) -> str:
        if not value.startswith(("postgres://", "postgresql://")):
            raise ValueError("must start with postgresql://")
        return value

    @model_validator(mode="after")
    def _window_within_ttl(self) -> Config:
        past = self.ingest.max_past_seconds
        if past is not None and past > self.counters.ttl_seconds:
            raise ValueError(
                f"ingest.max_past_seconds ({past}) exceeds counters.ttl_seconds "
                f"({self.counters.ttl_seconds}): such events would land in buckets that may already have expired"
            )
        return self

    @property
    def max_past_seconds(self) -> int:
        """How old an event's timestamp may be: the configured window, else the counter TTL."""
        return self.ingest.max_past_seconds or self.counters.ttl_seconds

    def to_file_dict(self) -> dict[str, Any]:
        """The YAML-serialisable form without connection strings (those come from env/Secrets)."""
        return self.model_dump(mode="json", exclude={"redis_url", "database_url"})


def _format_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key (check the spelling; see README 'Configuration')"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{source}: {key}: {message}{more}"


def parse_config(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Validate a mapping into a Config, raising ConfigError that names the bad key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(_format_error(error, source)) from None


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a plain mapping (no env applied)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{file}: cannot read config file: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the config: file (argument, else ``ANALYTICS_CONFIG``), then env overrides."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG_FILE) or None
    data: dict[str, Any] = read_config_file(path) if path else {}
    for variable, (key,) in ENV_OVERRIDES.items():
        if env.get(variable):
            data[key] = env[variable]
    return parse_config(data, source=str(path) if path else "config")
