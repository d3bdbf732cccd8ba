"""Accepted events land in the right Redis hash and field, with TTL, dirty ZSET and pipeline registration."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, kind_totals, pipeline_keys
from support import fresh_ttls

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, user_field
from analytics_pipeline.sidecar.appkeys import STATE as STATE_KEY


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def test_each_granularity_lands_in_its_hash_with_ttl_and_dirty_entry(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    moment = datetime.now(UTC) - timedelta(hours=2)
    before_ms = int(time.time() * 1000)
    since = time.monotonic()
    answer = await sidecar.post("/v1/events", {"event": "page_view", "user_id": "u1", "timestamp": iso(moment),
                                               "properties": {"path": "/"}})
    assert answer.status == 200, answer.body
    assert answer.body == {"accepted": 1, "duplicates": 0}
    assert answer.headers["Content-Type"].startswith("application/json")

    daily, hourly, per_user = keys.daily(moment), keys.hourly(moment), keys.user_daily(moment)
    assert await redis_client.hgetall(daily) == {"page_view": "1"}
    assert await redis_client.hgetall(hourly) == {"page_view": "1"}
    assert await redis_client.hgetall(per_user) == {user_field("page_view", "u1"): "1"}
    ttl = sidecar.app[STATE_KEY].config.counters.ttl_seconds
    for key in (daily, hourly, per_user):
        assert await redis_client.ttl(key) in fresh_ttls(ttl, since)
    dirty = dict(await redis_client.zrange(keys.dirty, 0, -1, withscores=True))
    assert set(dirty) == {daily, hourly, per_user}
    for score in dirty.values():
        assert before_ms - 1000 <= score <= time.time() * 1000 + 1000
    assert await redis_client.sismember(PIPELINES_SET, keys.pipeline)
    # The dirty score is the FIRST dirtying time: a later write does not move it.
    first = dirty[daily]
    assert (await sidecar.post("/v1/events", {"event": "page_view", "timestamp": iso(moment)})).status == 200
    assert await redis_client.zscore(keys.dirty, daily) == first
    assert await redis_client.hget(daily, "page_view") == "2"


async def test_buckets_are_utc_around_midnight_and_offsets(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    day = midnight.date()
    events = [
        {"event": "a", "timestamp": (midnight - timedelta(milliseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4]
         + "Z"},                                                               # 23:59:59.999Z, day before
        {"event": "b", "timestamp": midnight.strftime("%Y-%m-%dT%H:%M:%SZ")},   # 00:00:00Z, the day
        # 05:00 at +05:30 on `day` is 23:30Z of the day before
        {"event": "c", "timestamp": f"{day.isoformat()}T05:00:00+05:30"},
        # 20:00 at -05:00 on the day before is 01:00Z on `day`
        {"event": "d", "timestamp": f"{(day - timedelta(days=1)).isoformat()}T20:00:00-05:00"},
        # naive means UTC
        {"event": "e", "timestamp": f"{day.isoformat()}T23:00:00"},
    ]
    assert events[0]["timestamp"].endswith("23:59:59.999Z")
    answer = await sidecar.post("/v1/events", events)
    assert answer.status == 200, answer.body
    before = midnight - timedelta(days=1)
    assert await redis_client.hgetall(keys.daily(before)) == {"a": "1", "c": "1"}
    assert await redis_client.hgetall(keys.daily(midnight)) == {"b": "1", "d": "1", "e": "1"}
    assert await redis_client.hgetall(keys.hourly(before.replace(hour=23))) == {"a": "1", "c": "1"}
    assert await redis_client.hgetall(keys.hourly(midnight)) == {"b": "1"}
    assert await redis_client.hgetall(keys.hourly(midnight.replace(hour=1))) == {"d": "1"}
    assert await redis_client.hgetall(keys.hourly(midnight.replace(hour=23))) == {"e": "1"}
    assert keys.daily(before).endswith(before.strftime("%Y%m%d"))


async def test_explicit_past_timestamps_use_their_own_bucket(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    three_days = datetime.now(UTC) - timedelta(days=3, minutes=7)
    now = datetime.now(UTC)
    answer = await sidecar.post("/v1/events", [{"event": "old", "timestamp": iso(three_days)}, {"event": "new"}])
    assert answer.status == 200
    assert await redis_client.hgetall(keys.daily(three_days)) == {"old": "1"}
    assert await redis_client.hgetall(keys.hourly(three_days)) == {"old": "1"}
    assert (await redis_client.hget(keys.daily(now), "new")) == "1"


async def test_switched_off_granularities_are_not_written(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(counters={"granularities": ["hourly"], "ttl_seconds": 7200}))
    since = time.monotonic()
    answer = await sidecar.post("/v1/events", [{"event": "x", "user_id": "u"}, {"event": "x", "message_id": "m"}])
    assert answer.status == 200 and answer.body == {"accepted": 2, "duplicates": 0}
    # (the last commit's fence token stays until the next commit deletes it)
    live = [key for key in await pipeline_keys(redis_client, keys)
            if not key.startswith(keys.dedup_prefix) and ":gc:" not in key]
    now = datetime.now(UTC)
    assert set(live) == {keys.hourly(now), keys.dirty}
    assert await redis_client.ttl(keys.hourly(now)) in fresh_ttls(7200, since)
    assert await redis_client.hgetall(keys.hourly(now)) == {"x": "2"}


async def test_user_daily_only_for_events_with_a_user(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    answer = await sidecar.post("/v1/events", [{"event": "x"}, {"event": "x", "user_id": "u2"}])
    assert answer.status == 200
    now = datetime.now(UTC)
    assert await redis_client.hgetall(keys.user_daily(now)) == {user_field("x", "u2"): "1"}
    assert await redis_client.hgetall(keys.daily(now)) == {"x": "2"}


async def test_segment_and_posthog_shapes(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    track = {"type": "track", "event": "Signed Up", "userId": "s-user", "messageId": "seg-1",
             "timestamp": iso(datetime.now(UTC)), "properties": {"plan": "pro"}, "context": {"library": {}}}
    assert (await sidecar.post("/v1/track", track)).body == {"accepted": 1, "duplicates": 0, "success": True}
    segment_batch = {"batch": [{"type": "page", "anonymousId": "anon-1"},
                               {"type": "identify", "userId": "s-user", "traits": {}}],
                     "sentAt": iso(datetime.now(UTC)), "writeKey": "ignored"}
    # identify is acknowledged, not counted (ingest.uncounted_events)
    assert (await sidecar.post("/v1/batch", segment_batch)).body == {"accepted": 1, "duplicates": 0,
                                                                    "not_counted": 1, "success": True}
    posthog = {"api_key": "phc_x", "batch": [
        {"event": "$pageview", "distinct_id": "ph-user", "uuid": "0190-ph-1", "properties": {"$current_url": "/"}},
        {"event": "clicked", "properties": {"distinct_id": "ph-user-2"}, "type": "capture"}]}
    assert (await sidecar.post("/batch/", posthog)).body == {"accepted": 2, "duplicates": 0, "status": 1}
    # A retried Segment call and a retried PostHog event are recognised by messageId / uuid.
    assert (await sidecar.post("/v1/track", track)).body == {"accepted": 0, "duplicates": 1, "success": True}
    assert (await sidecar.post("/v1/batch", {"batch": posthog["batch"][:1]})).body == {
        "accepted": 0, "duplicates": 1, "success": True}
    now = datetime.now(UTC)
    assert await redis_client.hgetall(keys.daily(now)) == {
        "Signed Up": "1", "page_view": "1", "$pageview": "1", "clicked": "1"}
    assert await kind_totals(redis_client, keys, "u") == {
        user_field("Signed Up", "s-user"): 1, user_field("page_view", "anon-1"): 1,
        user_field("$pageview", "ph-user"): 1,
        user_field("clicked", "ph-user-2"): 1}


async def test_array_and_batch_wrapper_on_v1_events(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    assert (await sidecar.post("/v1/events", [{"event": "a"}, {"event": "a"}, {"event": "b"}])).body == {
        "accepted": 3, "duplicates": 0}
    assert (await sidecar.post("/v1/events", {"batch": [{"event": "b"}]})).body == {"accepted": 1, "duplicates": 0}
    assert (await sidecar.post("/v1/events", {"event": "c"}, content_type=None)).status == 200
    assert (await sidecar.post("/v1/events", {"event": "c"}, content_type="text/plain;charset=UTF-8")).status == 200
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"a": "2", "b": "2", "c": "2"}
