"""The one configuration model shared by sidecar, flusher and operator.

Loaded from a YAML file (``--config`` / ``ANALYTICS_CONFIG``) and then overridden by the
environment (``REDIS_URL``, ``DATABASE_URL``, ``ANALYTICS_PIPELINE``). Connection strings are
only ever taken from the environment or the file, never rendered by the operator: in Kubernetes
they come from Secrets.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

Granularity = Literal["daily", "hourly", "user_daily"]
ALL_GRANULARITIES: tuple[Granularity, ...] = ("daily", "hourly", "user_daily")

# Calls that describe users rather than something they did (see IngestConfig.uncounted_events).
UNCOUNTED_EVENTS: tuple[str, ...] = ("identify", "group", "alias", "$identify", "$set", "$create_alias",
                                     "$groupidentify")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_PIPELINE = "default/analytics"

# "<namespace>/<name>", both DNS-1123 labels, as in Kubernetes.
PIPELINE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# --- What PostgreSQL can index (issue 11, "no poison unit") -------------------------------------------
# An event name and a user id end up together in B-tree keys (analytics_user_daily's primary key:
# pipeline, day, user_id, event_type; analytics_user_last_seen's: pipeline, event_type, user_id). A
# B-tree (version 4, 8 kB pages) refuses an index row over 2704 bytes, and a refused row fails its
# whole flush unit. The worst row: an 8-byte tuple header, each of 4 columns with a 4-byte varlena
# header and up to 3 bytes of alignment (a date is 4 bytes), a pipeline name of up to 317 bytes
# (63 + "/" + 253, ASCII), rounded up to 8 bytes: so name + id must fit in 2704 - 8 - 4*7 - 317 - 7.
BTREE_MAX_ROW_BYTES = 2704
MAX_PIPELINE_BYTES = 317
INDEX_KEY_BUDGET_BYTES = BTREE_MAX_ROW_BYTES - 8 - 4 * 7 - MAX_PIPELINE_BYTES - 7  # 2344: name + id, UTF-8

ENV_CONFIG_FILE = "ANALYTICS_CONFIG"
ENV_OVERRIDES = {"REDIS_URL": ("redis_url",), "DATABASE_URL": ("database_url",), "ANALYTICS_PIPELINE": ("pipeline",)}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the bad key and how to fix it.

    ``key`` is the path of the bad key (``("server", "port")``, ``()`` for the whole config),
    ``reason`` what is wrong with it, ``value`` the value found (``MISSING`` when there is none).
    """

    def __init__(self, message: str, key: tuple[str, ...] = (), reason: str = "", value: Any = MISSING) -> None:
        super().__init__(message)
        self.key = key
        self.reason = reason or message
        self.value = value


class _Invalid(ValueError):
    """One bad value found while building the model: where, why and what was there."""

    def __init__(self, key: tuple[str, ...], reason: str, value: Any = MISSING) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason
        self.value = value


def limits(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           min_items: int | None = None, doc: str = "") -> Any:
    """A dataclass field with bounds the loader enforces (and the CRD schema test compares against)."""
    metadata = {name: bound for name, bound in (("ge", ge), ("gt", gt), ("le", le), ("min_items", min_items))
                if bound is not None}
    if doc:
        metadata["doc"] = doc
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class CountersConfig:
    """How live counters are kept in Redis."""

    ttl_seconds: int = limits(7 * 86400, ge=3600, le=366 * 86400, doc="TTL of every live Redis bucket")
    granularities: tuple[Granularity, ...] = limits(ALL_GRANULARITIES, min_items=1)
    # Shard k of N lives under its own hash tag (core/keys.py shard_tags), so on a Redis Cluster the N
    # shards spread over the masters. 1 keeps today's one-tag layout. Changing it on a live pipeline is
    # safe: old shards are drained by the flusher and read by queries until empty (docs/SCALING.md).
    shards: int = limits(1, ge=1, le=256, doc="Redis hash tags (cluster slots) the pipeline's counters spread over")

    def __post_init__(self) -> None:
        if len(set(self.granularities)) != len(self.granularities):
            raise _Invalid(("granularities",), "each granularity may be listed once", list(self.granularities))


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Limits applied by the sidecar before anything is counted (defaults after Segment's)."""

    max_event_bytes: int = limits(32 * 1024, ge=256, le=16 * 1024 * 1024)
    max_request_bytes: int = limits(500 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_batch_events: int = limits(2500, ge=1, le=100_000)
    # In UTF-8 bytes (a CJK character is 3): name + id together at most INDEX_KEY_BUDGET_BYTES.
    max_name_length: int = limits(128, ge=1, le=1024, doc="UTF-8 bytes of an event name")
    max_id_length: int = limits(256, ge=1, le=4096, doc="UTF-8 bytes of a user id or message id")
    max_future_seconds: int = limits(300, ge=0, le=86400)
    # None means "the counter TTL": an older event would land in a bucket that may already be gone.
    max_past_seconds: int | None = limits(None, ge=60)
    # 12 h: the longest retry horizon of the SDKs people point at us (docs/http-api.md "Dedup").
    dedup_window_seconds: int = limits(43200, ge=0, le=30 * 86400, doc="0 disables message_id dedup")
    # --- SDK compatibility (issue 10): how batches are accepted and which calls are counted ---------
    # False: a batch's valid events are counted and its invalid ones listed (200 with "rejected");
    # True: one invalid event refuses the whole request (400, nothing counted).
    all_or_nothing: bool = False
    # Event types acknowledged (200) but not counted: Segment's identify/group/alias calls (counted
    # under those names when they carry no "event") and PostHog's person/group updates. [] counts all.
    uncounted_events: tuple[str, ...] = UNCOUNTED_EVENTS

    def __post_init__(self) -> None:
        indexed = self.max_name_length + self.max_id_length
        if indexed > INDEX_KEY_BUDGET_BYTES:
            raise _Invalid(("max_id_length",), f"max_name_length + max_id_length is {indexed} bytes, over the "
                           f"{INDEX_KEY_BUDGET_BYTES} bytes PostgreSQL can index with them (a user id and an event "
                           f"name share one B-tree row of at most {BTREE_MAX_ROW_BYTES} bytes); lower one of them",
                           self.max_id_length)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where the sidecar listens and how it batches Redis writes."""

    host: str = "127.0.0.1"
    port: int = limits(8787, ge=0, le=65535)
    group_commit_window_ms: float = limits(2.0, ge=0, le=1000)
    group_commit_max_events: int = limits(5000, ge=1, le=1_000_000)
    redis_timeout_seconds: float = limits(2.0, gt=0, le=60)
    retry_after_seconds: int = limits(1, ge=1, le=3600)
    shutdown_timeout_seconds: float = limits(20.0, gt=0, le=600)
    # HTTP connection hygiene (aiohttp's defaults keep an idle connection 3,630 s and wait forever for
    # headers): an idle keep-alive connection is closed after this long, and a request whose line and
    # headers have not all arrived this long after its first byte is answered 408 and closed.
    keepalive_timeout_seconds: float = limits(75.0, gt=0, le=3600)
    header_timeout_seconds: float = limits(10.0, gt=0, le=600)
    # A malformed request (bad HTTP, not bad events) is logged on one line, at most this many a minute.
    bad_request_logs_per_minute: int = limits(10, ge=0, le=10_000)
    # --- The probe listener (Kubernetes): a second address serving ONLY /healthz, /readyz and /metrics, so
    # the kubelet and Prometheus reach the sidecar on the pod IP while ingest, queries and the dashboard stay
    # on `host` (loopback). None = no second listener (outside Kubernetes; the main one serves all routes).
    health_host: str = "0.0.0.0"
    health_port: int | None = limits(None, ge=0, le=65535, doc="None: no probe listener; 0: any free port")
    # --- Replicated acks (docs/SCALING.md): after each group commit, WAIT for this many replicas to have it;
    # fewer within wait_replicas_timeout_seconds -> the write is in doubt and is settled by the fence logic
    # (200 once replicated, 503 if a failover lost it), never counted twice. 0: ack once the master has it.
    wait_replicas: int = limits(0, ge=0, le=16, doc="replicas that must hold a write before it is acked")
    wait_replicas_timeout_seconds: float = limits(1.0, gt=0, le=60, doc="how long one WAIT may take")


@dataclass(frozen=True, slots=True)
class FlushConfig:
    """How the flusher moves counters into PostgreSQL."""

    batch_size: int = limits(1000, ge=1, le=1_000_000, doc="buckets claimed per transaction")
    retention_days: int = limits(400, ge=1, le=36500)
    # Short, and extended every ttl/3 while a run lasts: a killed flusher blocks the next run briefly.
    lock_ttl_seconds: int = limits(60, ge=5, le=86400)
    statement_timeout_seconds: float = limits(60.0, gt=0, le=3600)
    # --- Dead letters (docs/flush-protocol.md "Dead letters") -------------------------------------------
    # A unit whose apply failed this many runs in a row is moved to analytics_dead_letter, so the rest of
    # the pipeline flows; `analytics-pipeline deadletter retry|discard` settles it exactly once.
    dead_letter_after_failures: int = limits(3, ge=1, le=1000, doc="failed runs before a unit is set aside")
    # Shards of one pipeline flushed at once (docs/flush-protocol.md "Shards"), each over its own PostgreSQL
    # connection; their Redis work overlaps, their applies take turns under the pipeline's advisory lock.
    shard_concurrency: int = limits(4, ge=1, le=64, doc="shards of a pipeline flushed at once")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """What sidecar and flusher require of Redis and how they keep headroom (README 'Redis requirements')."""

    # Any maxmemory-policy but noeviction can silently drop acked counts or dedup keys: readiness fails
    # and the flusher exits non-zero unless this says the risk is accepted.
    allow_eviction: bool = False
    # The sidecar answers 503 once used_memory reaches this share of maxmemory, so that Redis never
    # refuses writes and the flusher (which frees memory) always has room to run.
    memory_high_water_ratio: float = limits(0.9, gt=0, le=1)
    memory_check_interval_seconds: float = limits(1.0, ge=0.05, le=60, doc="how often INFO memory is sampled")
    # Redis Cluster: "auto" asks the server (INFO cluster) on connect; "on"/"off" force it (docs/SCALING.md).
    cluster: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True, slots=True)
class QueryConfig:
    """How the read endpoints keep away from ingest (docs/queries.md, "Reads never block writes")."""

    # Uniques and per-user counts read per-user buckets; beyond this many of a kind at once per sidecar: 429.
    max_concurrent: int = limits(1, ge=1, le=64, doc="uniques / per-user count queries at once, each")
    wait_seconds: float = limits(0.25, ge=0, le=60, doc="how long a heavy query may wait for a slot")
    retry_after_seconds: int = limits(1, ge=1, le=3600, doc="Retry-After of a refused query")
    # Fields per HSCAN piece / HMGET of a per-user bucket: one short Redis call each (~1 ms at 1000 on a
    # busy 2-core machine); capped so that no setting makes one call walk a big bucket.
    scan_count: int = limits(1000, ge=10, le=10_000, doc="hash fields per HSCAN piece")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything one pipeline's components need to know (build it with :func:`parse_config`)."""

    pipeline: str = DEFAULT_PIPELINE
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    counters: CountersConfig = field(default_factory=CountersConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    flush: FlushConfig = field(default_factory=FlushConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    queries: QueryConfig = field(default_factory=QueryConfig)

    def __post_init__(self) -> None:
        pipeline = self.pipeline if "/" in self.pipeline else f"default/{self.pipeline}"
        if not PIPELINE_RE.match(pipeline):
            raise _Invalid(("pipeline",), "must be '<namespace>/<name>' in lower-case letters, digits and '-' "
                           "(e.g. 'default/web')", self.pipeline)
        object.__setattr__(self, "pipeline", pipeline)
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise _Invalid(("redis_url",), "must start with redis://, rediss:// or unix://", self.redis_url)
        if not self.database_url.startswith(("postgres://", "postgresql://")):
            raise _Invalid(("database_url",), "must start with postgresql://", self.database_url)
        past = self.ingest.max_past_seconds
        if past is not None and past > self.counters.ttl_seconds:
            raise _Invalid((), f"ingest.max_past_seconds ({past}) exceeds counters.ttl_seconds "
                           f"({self.counters.ttl_seconds}): such events would land in buckets that may already "
                           "have expired")

    @property
    def max_past_seconds(self) -> int:
        """How old an event's timestamp may be: the configured window, else the counter TTL."""
        return self.ingest.max_past_seconds or self.counters.ttl_seconds

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied, validated like a file (ConfigError names the bad key)."""
        return parse_config({**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable form (lists for tuples); ``parse_config`` reads it back."""
        return _plain(self)

    def to_file_dict(self) -> dict[str, Any]:
        """The YAML-serialisable form without connection strings (those come from env/Secrets)."""
        data = self.as_dict()
        del data["redis_url"], data["database_url"]
        return data


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _describe(value: Any) -> str:
    return f"{value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _scalar(kind: Any, value: Any, key: tuple[str, ...]) -> Any:
    """``value`` as the scalar type ``kind`` (int, float, str, or a Literal), or _Invalid."""
    if get_origin(kind) is Literal:
        if value not in get_args(kind):
            choices = ", ".join(repr(choice) for choice in get_args(kind))
            raise _Invalid(key, f"must be one of {choices}", value)
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise _Invalid(key, f"must be true or false, got {_describe(value)}", value)
        return value
    if kind is str:
        if not isinstance(value, str):
            raise _Invalid(key, f"must be a string, got {_describe(value)}", value)
        return value
    if isinstance(value, str):  # a quoted number ("8080"), as YAML and Helm values often have them
        value = _number_from_text(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        noun = "an integer" if kind is int else "a number"
        raise _Invalid(key, f"must be {noun}, got {_describe(value)}", value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(key, f"must be a finite number, got {value!r}", value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise _Invalid(key, f"must be an integer, got {value!r}", value)
        return int(value)
    return float(value)


def _number_from_text(text: str) -> Any:
    """``text`` as an int or a finite float when it spells one, else ``text`` unchanged."""
    stripped = text.strip()
    if re.fullmatch(r"[+-]?\d+", stripped):
        return int(stripped)
    try:
        number = float(stripped)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _check_bounds(metadata: Mapping[str, Any], value: Any, key: tuple[str, ...]) -> None:
    for name, words, broken in (("ge", "greater than or equal to", lambda v, b: v < b),
                                ("gt", "greater than", lambda v, b: v <= b),
                                ("le", "less than or equal to", lambda v, b: v > b)):
        bound = metadata.get(name)
        if bound is not None and broken(value, bound):
            raise _Invalid(key, f"must be {words} {bound} (got {value!r})", value)


def _value(kind: Any, metadata: Mapping[str, Any], value: Any, key: tuple[str, ...]) -> Any:
    """Convert and check one field's value against its annotation and bounds."""
    if is_dataclass(kind):
        return _build(kind, value, key)
    args = get_args(kind)
    if get_origin(kind) in (UnionType, Union) and type(None) in args:  # Optional[X]
        if value is None:
            return None
        kind = next(arg for arg in args if arg is not type(None))
    if get_origin(kind) is tuple:  # tuple[X, ...]
        if not isinstance(value, list | tuple):
            raise _Invalid(key, f"must be a list, got {_describe(value)}", value)
        minimum = metadata.get("min_items")
        if minimum is not None and len(value) < minimum:
            raise _Invalid(key, f"must list at least {minimum} item(s)", list(value))
        item_kind = get_args(kind)[0]
        return tuple(_scalar(item_kind, item, (*key, str(index))) for index, item in enumerate(value))
    converted = _scalar(kind, value, key)
    _check_bounds(metadata, converted, key)
    return converted


def _build(cls: Any, data: Any, key: tuple[str, ...] = ()) -> Any:
    """An instance of the dataclass ``cls`` from a mapping, or _Invalid naming the first bad key."""
    if not isinstance(data, Mapping):
        raise _Invalid(key, f"must be a mapping of keys, got {_describe(data)}", data)
    known = {f.name: f for f in fields(cls)}
    for name in data:
        if name not in known:
            raise _Invalid((*key, str(name)), "unknown key (check the spelling; see README 'Configuration')",
                           data[name])
    hints = get_type_hints(cls)
    values = {name: _value(hints[name], known[name].metadata, data[name], (*key, name)) for name in data}
    try:
        return cls(**values)
    except _Invalid as invalid:  # a cross-field check: its key is relative to this section
        raise _Invalid((*key, *invalid.key), invalid.reason, invalid.value) from None


def parse_config(data: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Validate a mapping into a Config, raising ConfigError that names the bad key."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        config: Config = _build(Config, data)
    except _Invalid as invalid:
        name = ".".join(invalid.key) or "(top level)"
        raise ConfigError(f"{source}: {name}: {invalid.reason}", invalid.key, invalid.reason,
                          invalid.value) from None
    return config


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
