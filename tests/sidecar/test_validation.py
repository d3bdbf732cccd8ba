"""Every limit and malformed input gets a 4xx naming the problem, and nothing of the request is counted.

These run with ``ingest.all_or_nothing: true``, where one invalid event refuses its whole batch; the
default partial acceptance of batches is tested in test_partial_acceptance.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, pipeline_keys

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import STATE


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis) -> Sidecar:
    """A sidecar that refuses a batch whole when any of its events is invalid."""
    return await start_sidecar(sidecar_config(ingest={"all_or_nothing": True}))


def _iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


GOOD = {"event": "ok"}

# (id, path, raw body, content type, status, error code, (index, field, reason substring) expected in errors)
CASES: list[tuple[str, str, bytes, str | None, int, str, tuple[Any, str, str]]] = [
    ("invalid-json", "/v1/events", b'{"event": "a"', "application/json", 400, "invalid_json",
     (None, "body", "invalid JSON")),
    ("nan", "/v1/events", b'{"event": "a", "properties": {"x": NaN}}', "application/json", 400, "invalid_json",
     (None, "body", "invalid JSON")),
    ("infinity-number", "/v1/events", b'{"event": "a", "properties": {"x": 1e400}}', "application/json", 400,
     "invalid_json", (None, "body", "infinity")),
    ("invalid-utf8", "/v1/events", b'{"event": "\xff"}', "application/json", 400, "invalid_json",
     (None, "body", "UTF-8")),
    ("deep-nesting", "/v1/events", b'{"event": "a", "properties": ' + b"[" * 2000 + b"]" * 2000 + b"}",
     "application/json", 400, "invalid_json", (None, "body", "depth")),
    ("empty-body", "/v1/events", b"", "application/json", 400, "invalid_request", (None, "body", "empty")),
    ("blank-body", "/v1/events", b"  \n ", "application/json", 400, "invalid_request", (None, "body", "empty")),
    ("scalar-body", "/v1/events", b'"page_view"', "application/json", 400, "invalid_request",
     (None, "body", "not a string")),
    ("empty-array", "/v1/events", b"[]", "application/json", 400, "invalid_request", (None, "batch", "empty")),
    ("batch-not-array", "/v1/events", b'{"batch": {"event": "a"}}', "application/json", 400, "invalid_request",
     (None, "batch", "must be an array")),
    ("event-not-object", "/v1/events", b'[{"event": "a"}, "b"]', "application/json", 400, "invalid_events",
     (1, "(event)", "must be a JSON object")),
    ("missing-event", "/v1/events", b'{"user_id": "u"}', "application/json", 400, "invalid_events",
     (0, "event", "is required")),
    ("event-number", "/v1/events", b'{"event": 5}', "application/json", 400, "invalid_events",
     (0, "event", "must be a string")),
    ("event-empty", "/v1/events", b'{"event": "  "}', "application/json", 400, "invalid_events",
     (0, "event", "must not be empty")),
    ("event-too-long", "/v1/events", b'{"event": "' + b"x" * 129 + b'"}', "application/json", 400,
     "invalid_events", (0, "event", "over the limit of 128")),
    ("event-control-char", "/v1/events", b'{"event": "a\\u0000b"}', "application/json", 400, "invalid_events",
     (0, "event", "control characters")),
    ("user-id-number", "/v1/events", b'{"event": "a", "user_id": 42}', "application/json", 400, "invalid_events",
     (0, "user_id", "must be a string")),
    ("segment-user-array", "/v1/events", b'{"event": "a", "userId": ["u"]}', "application/json", 400,
     "invalid_events", (0, "userId", "must be a string")),
    ("message-id-object", "/v1/events", b'{"event": "a", "message_id": {"x": 1}}', "application/json", 400,
     "invalid_events", (0, "message_id", "must be a string")),
    ("posthog-uuid-empty", "/v1/events", b'{"event": "a", "uuid": ""}', "application/json", 400, "invalid_events",
     (0, "uuid", "must not be empty")),
    ("user-id-too-long", "/v1/events", b'{"event": "a", "user_id": "' + b"u" * 257 + b'"}', "application/json",
     400, "invalid_events", (0, "user_id", "over the limit of 256")),
    ("properties-array", "/v1/events", b'{"event": "a", "properties": [1, 2]}', "application/json", 400,
     "invalid_events", (0, "properties", "must be an object")),
    ("unknown-type", "/v1/events", b'{"type": "launch", "event": "a"}', "application/json", 400,
     "invalid_events", (0, "type", "must be one of")),
    ("timestamp-number", "/v1/events", b'{"event": "a", "timestamp": 1764237600}', "application/json", 400,
     "invalid_events", (0, "timestamp", "ISO-8601")),
    ("timestamp-huge-number", "/v1/events", b'{"event": "a", "timestamp": 123456789012345678901234567890}',
     "application/json", 400, "invalid_events", (0, "timestamp", "ISO-8601")),
    ("timestamp-garbage", "/v1/events", b'{"event": "a", "timestamp": "yesterday"}', "application/json", 400,
     "invalid_events", (0, "timestamp", "is not an ISO-8601 time")),
    ("timestamp-date-only", "/v1/events", b'{"event": "a", "timestamp": "2026-11-27"}', "application/json", 400,
     "invalid_events", (0, "timestamp", "is not an ISO-8601 time")),
    ("timestamp-year-1", "/v1/events", b'{"event": "a", "timestamp": "0001-01-01T00:00:00+05:30"}',
     "application/json", 400, "invalid_events", (0, "timestamp", "ISO-8601")),
    ("track-takes-one", "/v1/track", b'[{"event": "a"}]', "application/json", 400, "invalid_request",
     (None, "body", "must be a JSON object")),
    ("batch-needs-batch", "/v1/batch", b'{"event": "a"}', "application/json", 400, "invalid_request",
     (None, "batch", "is required")),
    ("content-type-form", "/v1/events", b'{"event": "a"}', "application/x-www-form-urlencoded", 415,
     "unsupported_media_type", (None, "Content-Type", "application/json")),
    ("content-type-html", "/v1/events", b'{"event": "a"}', "text/html", 415, "unsupported_media_type",
     (None, "Content-Type", "application/json")),
    ("content-type-octets", "/v1/batch", b'{"batch": []}', "application/octet-stream", 415,
     "unsupported_media_type", (None, "Content-Type", "application/json")),
]


async def _assert_nothing_counted(redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    assert await pipeline_keys(redis_client, keys) == []


@pytest.mark.parametrize(("path", "raw", "content_type", "status", "code", "expected"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
async def test_malformed_input_is_refused_with_a_reason(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, path: str, raw: bytes,
        content_type: str | None, status: int, code: str, expected: tuple[Any, str, str]) -> None:
    answer = await sidecar.post(path, raw=raw, content_type=content_type)
    assert answer.status == status, answer.body
    assert answer.body["error"] == code
    index, field, reason = expected
    assert any(error["index"] == index and error["field"] == field and reason in error["reason"]
               for error in answer.body["errors"]), answer.body
    assert answer.body["message"]
    await _assert_nothing_counted(redis_client, keys)
    assert sidecar.metrics.requests_refused.labels(code)._value.get() == 1


async def test_timestamps_outside_the_window(sidecar: Sidecar, redis_client: aioredis.Redis,
                                             keys: PipelineKeys) -> None:
    ttl = sidecar.app[STATE].config.counters.ttl_seconds
    body = [GOOD, {"event": "a", "timestamp": _iso(timedelta(minutes=10))},
            {"event": "a", "timestamp": _iso(timedelta(seconds=-ttl - 60))},
            {"event": "a", "timestamp": _iso(timedelta(minutes=4))}]
    answer = await sidecar.post("/v1/events", body)
    assert answer.status == 400
    errors = {(e["index"], e["field"]): e["reason"] for e in answer.body["errors"]}
    assert set(errors) == {(1, "timestamp"), (2, "timestamp")}
    assert "in the future" in errors[(1, "timestamp")]
    assert "in the past" in errors[(2, "timestamp")]
    await _assert_nothing_counted(redis_client, keys)


async def test_every_bad_event_is_listed_and_good_ones_are_not_counted(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    body = {"batch": [GOOD, {"event": ""}, GOOD, {"event": "a", "user_id": 7, "message_id": 8}, 3]}
    answer = await sidecar.post("/v1/batch", body)
    assert answer.status == 400
    assert answer.body["error"] == "invalid_events"
    assert "3 of 5 events are invalid" in answer.body["message"]
    listed = [(e["index"], e["field"]) for e in answer.body["errors"]]
    assert listed == [(1, "event"), (3, "user_id"), (3, "message_id"), (4, "(event)")]
    await _assert_nothing_counted(redis_client, keys)
    assert sidecar.metrics.events_refused.labels("invalid_events")._value.get() == 5


async def test_lowered_limits_are_enforced(start_sidecar: SidecarFactory, sidecar_config,
                                           redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"all_or_nothing": True,
        "max_batch_events": 3, "max_request_bytes": 2048, "max_event_bytes": 256, "max_name_length": 8,
        "max_id_length": 4}))
    too_many = await sidecar.post("/v1/events", [GOOD] * 4)
    assert too_many.status == 413 and too_many.body["errors"][0]["field"] == "batch"
    assert "over the limit of 3" in too_many.body["message"]

    big_event = await sidecar.post("/v1/events", [GOOD, {"event": "a", "properties": {"p": "x" * 300}}])
    assert big_event.status == 413
    assert big_event.body["errors"] == [{"index": 1, "field": "(event)",
                                         "reason": big_event.body["errors"][0]["reason"]}]
    assert "over the 256-byte limit" in big_event.body["errors"][0]["reason"]

    big_body = await sidecar.post("/v1/events", raw=b'{"event": "a", "properties": {"p": "' + b"x" * 3000 + b'"}}')
    assert big_body.status == 413 and big_body.body["error"] == "payload_too_large"
    assert "2048-byte limit" in big_body.body["message"]

    long_name = await sidecar.post("/v1/events", {"event": "abcdefghi"})
    assert long_name.status == 400 and "over the limit of 8" in long_name.body["errors"][0]["reason"]
    long_id = await sidecar.post("/v1/events", {"event": "a", "user_id": "12345"})
    assert long_id.status == 400 and long_id.body["errors"][0]["field"] == "user_id"

    await _assert_nothing_counted(redis_client, keys)
    ok = await sidecar.post("/v1/events", [GOOD] * 3)
    assert ok.status == 200 and ok.body == {"accepted": 3, "duplicates": 0}


async def test_huge_body_is_refused_before_it_is_read(start_sidecar: SidecarFactory, sidecar_config,
                                                      redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"max_request_bytes": 4096}))
    # Declared too large: refused from Content-Length alone.
    answer = await sidecar.post("/v1/events", raw=b"[" + b'{"event":"a"},' * 5000 + b'{"event":"a"}]')
    assert answer.status == 413
    assert "or more" in answer.body["message"]

    # Chunked (no Content-Length): reading stops right after the limit.
    async def chunks():
        yield b"["
        for _ in range(20_000):
            yield b'{"event": "a"},'
        yield b'{"event": "a"}]'

    async with sidecar.session.post(sidecar.url + "/v1/events", data=chunks(),
                                    headers={"Content-Type": "application/json"}) as response:
        assert response.status == 413
        body = await response.json()
        assert body["error"] == "payload_too_large"
    await _assert_nothing_counted(redis_client, keys)


async def test_wrong_method_and_unknown_path_are_4xx(sidecar: Sidecar) -> None:
    assert (await sidecar.get("/v1/track")).status == 405
    async with sidecar.session.put(sidecar.url + "/v1/events", json=GOOD) as response:
        assert response.status == 405
    assert (await sidecar.post("/v2/events", GOOD)).status == 404


async def test_gzip_body_is_accepted_and_corrupt_gzip_refused(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    import gzip

    ok = await sidecar.post("/v1/batch", raw=gzip.compress(b'{"batch": [{"event": "zipped"}]}'),
                            headers={"Content-Encoding": "gzip"})
    assert ok.status == 200 and ok.body == {"accepted": 1, "duplicates": 0, "success": True}
    bad = await sidecar.post("/v1/batch", raw=b"\x1f\x8bnot really gzip", headers={"Content-Encoding": "gzip"})
    assert 400 <= bad.status < 500
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"zipped": "1"}


async def test_id_limits_are_utf8_bytes_so_a_2000_character_cjk_user_id_is_refused(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    # Issue 11 case 3: with max_id_length raised to 2000, 2,000 CJK characters (6,000 bytes) once passed and
    # then failed every flush (index row size 6040 exceeds btree version 4 maximum 2704).
    sidecar = await start_sidecar(sidecar_config(ingest={"max_id_length": 2000}))
    cjk = "".join(chr(0x4E00 + (n * 7919) % 20000) for n in range(2000))
    refused = await sidecar.post("/v1/events", {"event": "a", "user_id": cjk})
    assert refused.status == 400, refused.body
    assert refused.body["errors"] == [{"index": 0, "field": "user_id",
                                       "reason": "is 6000 bytes in UTF-8, over the limit of 2000 bytes"}]
    name = await sidecar.post("/v1/events", {"event": "事" * 43, "message_id": "m"})  # 129 bytes > 128
    assert name.status == 400 and "129 bytes in UTF-8" in name.body["errors"][0]["reason"]
    await _assert_nothing_counted(redis_client, keys)
    fits = await sidecar.post("/v1/events", {"event": "a", "user_id": cjk[:666]})  # 1998 bytes
    assert fits.status == 200 and fits.body == {"accepted": 1, "duplicates": 0}, fits.body
