"""Which calls are counted: ``ingest.uncounted_events`` (identify/group/alias and PostHog's person updates
by default) are acknowledged with 200 but not counted, so they do not make users look active."""

from __future__ import annotations

from datetime import UTC, datetime

import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, kind_totals, per_event

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import STATE

SEGMENT = {"batch": [{"type": "track", "event": "Bought", "userId": "u1", "messageId": "m1"},
                     {"type": "page", "userId": "u1"}, {"type": "screen", "userId": "u2"},
                     {"type": "identify", "userId": "u3", "traits": {"plan": "pro"}, "messageId": "m2"},
                     {"type": "group", "userId": "u3", "groupId": "g"}, {"type": "alias", "userId": "u3"}]}
POSTHOG = {"api_key": "phc", "batch": [{"event": "$pageview", "distinct_id": "u4"},
                                       {"event": "$identify", "distinct_id": "u5"},
                                       {"event": "$set", "distinct_id": "u5"},
                                       {"event": "$create_alias", "distinct_id": "u5"},
                                       {"event": "$groupidentify", "distinct_id": "u5"}]}


async def test_default_counts_track_page_screen_only(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                     keys: PipelineKeys) -> None:
    segment = await sidecar.post("/v1/batch", SEGMENT)
    posthog = await sidecar.post("/batch/", POSTHOG)
    assert (segment.body["accepted"], segment.body["not_counted"]) == (3, 3)
    assert (posthog.body["accepted"], posthog.body["not_counted"]) == (1, 4)
    assert await kind_totals(redis_client, keys, "d") == {"Bought": 1, "page_view": 1, "screen_view": 1,
                                                          "$pageview": 1}
    users = await kind_totals(redis_client, keys, "u")
    assert not any("u3" in field or "u5" in field for field in users), users  # they did nothing countable
    metric = sidecar.metrics.events_not_counted
    assert {name: metric.labels(name)._value.get() for name in ("identify", "group", "alias", "$identify", "$set",
                                                                "$create_alias", "$groupidentify")} == {
        "identify": 1, "group": 1, "alias": 1, "$identify": 1, "$set": 1, "$create_alias": 1, "$groupidentify": 1}
    # An uncounted call's messageId is not remembered: once counted (config change) it is not a "duplicate".
    state = sidecar.app[STATE]
    state.apply(state.config.replace(ingest={"uncounted_events": []}))
    again = await sidecar.post("/v1/batch", SEGMENT)
    assert (again.body["accepted"], again.body["duplicates"]) == (5, 1)  # only the track call's m1 was seen


async def test_an_empty_list_counts_every_call(start_sidecar: SidecarFactory, sidecar_config,
                                               redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"uncounted_events": []}))
    answer = await sidecar.post("/v1/batch", SEGMENT)
    assert answer.body == {"accepted": 6, "duplicates": 0, "success": True}
    assert per_event(await kind_totals(redis_client, keys, "u")) == {
        "Bought": 1, "page_view": 1, "screen_view": 1, "identify": 1, "group": 1, "alias": 1}


async def test_a_custom_list_and_a_reload(start_sidecar: SidecarFactory, sidecar_config,
                                          redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    config = sidecar_config(ingest={"uncounted_events": ["$pageview"]})
    sidecar = await start_sidecar(config)
    answer = await sidecar.post("/batch/", POSTHOG)
    assert (answer.body["accepted"], answer.body["not_counted"]) == (4, 1)
    sidecar.app[STATE].apply(config.replace(ingest={"uncounted_events": ["$set"]}))
    again = await sidecar.post("/batch/", POSTHOG)
    assert (again.body["accepted"], again.body["not_counted"]) == (4, 1)
    today = await redis_client.hgetall(keys.daily(datetime.now(UTC)))
    assert today == {"$pageview": "1", "$identify": "2", "$set": "1", "$create_alias": "2", "$groupidentify": "2"}
