"""The shared config model: defaults, file + env overrides, and validation messages that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from analytics_pipeline.core.config import (
    DEFAULT_DATABASE_URL,
    DEFAULT_PIPELINE,
    DEFAULT_REDIS_URL,
    INDEX_KEY_BUDGET_BYTES,
    ConfigError,
    load_config,
    parse_config,
)


def test_defaults() -> None:
    config = load_config(env={})
    assert config.pipeline == DEFAULT_PIPELINE
    assert config.redis_url == DEFAULT_REDIS_URL and config.database_url == DEFAULT_DATABASE_URL
    assert config.server.host == "127.0.0.1" and config.server.port == 8787
    assert config.server.group_commit_window_ms == 2.0
    assert config.counters.granularities == ("daily", "hourly", "user_daily")
    assert config.counters.ttl_seconds == 7 * 86400
    assert config.ingest.max_event_bytes == 32 * 1024 and config.ingest.max_request_bytes == 500 * 1024
    assert config.ingest.max_batch_events == 2500 and config.ingest.max_name_length == 128
    assert config.ingest.dedup_window_seconds == 43200
    assert config.max_past_seconds == config.counters.ttl_seconds


def test_file_then_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pipeline: shop/web\nredis_url: redis://file:6379/0\ncounters:\n  ttl_seconds: 7200\n")
    from_file = load_config(path, env={})
    assert from_file.pipeline == "shop/web" and from_file.redis_url == "redis://file:6379/0"
    assert from_file.counters.ttl_seconds == 7200
    env = {"REDIS_URL": "redis://env:6380/1", "DATABASE_URL": "postgresql://u@db/x", "ANALYTICS_PIPELINE": "ns/other"}
    overridden = load_config(path, env=env)
    assert overridden.redis_url == "redis://env:6380/1"
    assert overridden.database_url == "postgresql://u@db/x"
    assert overridden.pipeline == "ns/other"
    assert overridden.counters.ttl_seconds == 7200
    # The file may also come from ANALYTICS_CONFIG; empty env values do not override.
    assert load_config(env={"ANALYTICS_CONFIG": str(path), "REDIS_URL": ""}).redis_url == "redis://file:6379/0"


def test_bare_pipeline_name_gets_default_namespace() -> None:
    assert parse_config({"pipeline": "web"}).pipeline == "default/web"


@pytest.mark.parametrize(("data", "key", "words"), [
    ({"counters": {"ttl": 5}}, "counters.ttl", "unknown key"),
    ({"colour": "red"}, "colour", "unknown key"),
    ({"server": {"port": "eighty"}}, "server.port", "integer"),
    ({"server": {"port": 70000}}, "server.port", "less than or equal to 65535"),
    ({"counters": {"ttl_seconds": 60}}, "counters.ttl_seconds", "greater than or equal to 3600"),
    ({"counters": {"granularities": ["weekly"]}}, "counters.granularities.0", "'daily'"),
    ({"counters": {"granularities": ["daily", "daily"]}}, "counters.granularities", "listed once"),
    ({"counters": {"granularities": []}}, "counters.granularities", "at least 1"),
    ({"pipeline": "Bad_Name/x"}, "pipeline", "<namespace>/<name>"),
    ({"redis_url": "http://x"}, "redis_url", "redis://"),
    ({"database_url": "mysql://x"}, "database_url", "postgresql://"),
    ({"ingest": {"max_batch_events": 0}}, "ingest.max_batch_events", "greater than or equal to 1"),
    ({"ingest": {"max_past_seconds": 999999999}, "counters": {"ttl_seconds": 7200}}, "(top level)",
     "exceeds counters.ttl_seconds"),
    ({"server": {"port": True}}, "server.port", "must be an integer, got True (bool)"),
    ({"server": {"port": 80.5}}, "server.port", "integer"),
    ({"server": {"port": "80.5"}}, "server.port", "must be an integer, got 80.5"),
    ({"server": {"redis_timeout_seconds": "nan"}}, "server.redis_timeout_seconds", "must be a number, got 'nan'"),
    ({"server": {"redis_timeout_seconds": float("inf")}}, "server.redis_timeout_seconds", "finite number"),
    ({"server": {"port": None}}, "server.port", "integer"),
    ({"server": {"host": 5}}, "server.host", "must be a string"),
    ({"server": {"redis_timeout_seconds": 0}}, "server.redis_timeout_seconds", "greater than 0 (got 0.0)"),
    ({"counters": "big"}, "counters", "must be a mapping"),
    ({"counters": {"granularities": "daily"}}, "counters.granularities", "must be a list"),
])
def test_validation_names_the_key(data: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(data, source="my.yaml")
    message = str(error.value)
    assert message.startswith(f"my.yaml: {key}: "), message
    assert words in message
    assert "\n" not in message


def test_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(missing, env={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(broken, env={})
    assert "\n" not in str(error.value)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar, env={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, env={}).pipeline == DEFAULT_PIPELINE


def test_config_is_frozen_and_file_dict_has_no_secrets() -> None:
    config = parse_config({"redis_url": "redis://:secret@r:6379/0"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.pipeline = "x/y"  # type: ignore[misc]
    as_file = config.to_file_dict()
    assert "redis_url" not in as_file and "database_url" not in as_file
    assert parse_config(as_file).counters == config.counters


def test_numbers_are_normalised_and_optional_fields_take_null() -> None:
    quoted = parse_config({"server": {"port": "8080", "group_commit_window_ms": " 2.5 "}})
    assert quoted.server.port == 8080 and quoted.server.group_commit_window_ms == 2.5
    config = parse_config({"server": {"port": 8080.0, "group_commit_window_ms": 3},
                           "ingest": {"max_past_seconds": None}, "counters": {"granularities": ["daily"]}})
    assert config.server.port == 8080 and isinstance(config.server.port, int)
    assert config.server.group_commit_window_ms == 3.0 and isinstance(config.server.group_commit_window_ms, float)
    assert config.ingest.max_past_seconds is None and config.counters.granularities == ("daily",)


def test_replace_validates_and_as_dict_round_trips() -> None:
    config = parse_config({"pipeline": "shop/web", "counters": {"ttl_seconds": 7200}})
    assert config.replace(pipeline="other").pipeline == "default/other"
    assert config.replace(pipeline="other").counters == config.counters
    with pytest.raises(ConfigError) as error:
        config.replace(pipeline="Not Valid")
    assert error.value.key == ("pipeline",) and "<namespace>/<name>" in error.value.reason
    assert parse_config(config.as_dict()) == config
    assert config.as_dict()["counters"]["granularities"] == ["daily", "hourly", "user_daily"]


def test_name_and_id_limits_must_fit_a_postgresql_btree_row() -> None:
    # bytes, not characters: name + id share analytics_user_daily's primary key (at most 2704 bytes a row)
    assert parse_config({"ingest": {"max_id_length": 2000}}).ingest.max_id_length == 2000
    assert INDEX_KEY_BUDGET_BYTES == 2344
    edge = parse_config({"ingest": {"max_name_length": 128, "max_id_length": INDEX_KEY_BUDGET_BYTES - 128}})
    assert edge.ingest.max_id_length == 2216
    with pytest.raises(ConfigError) as error:
        parse_config({"ingest": {"max_id_length": 4096}})
    assert error.value.key == ("ingest", "max_id_length")
    assert "4224 bytes, over the 2344 bytes PostgreSQL can index" in str(error.value)
    with pytest.raises(ConfigError, match="max_name_length \\+ max_id_length"):
        parse_config({"ingest": {"max_name_length": 1024, "max_id_length": 1400}})
