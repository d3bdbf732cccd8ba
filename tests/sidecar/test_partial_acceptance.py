"""Partial acceptance: a batch's valid events are counted, its invalid ones listed (ARCHITECTURE guarantee 5).

SDK batches mix unrelated events; refusing 20 good events for one bad timestamp lost them all (the
SDKs do not resend a 400). ``ingest.all_or_nothing: true`` restores whole-request refusal.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, SidecarFactory, kind_totals, pipeline_keys

from analytics_pipeline.core.keys import PipelineKeys


def _iso(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


def mixed_batch() -> list[dict[str, object]]:
    """20 good events and one timestamped 8 days ago (older than the 7-day counter TTL)."""
    good = [{"type": "track", "event": f"e{i % 3}", "userId": f"u{i}", "messageId": f"m-{i}"} for i in range(20)]
    return [*good[:7], {"type": "track", "event": "late", "userId": "u", "timestamp": _iso(timedelta(days=-8))},
            *good[7:]]


async def test_valid_events_of_a_mixed_batch_are_counted_and_the_bad_one_listed(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    answer = await sidecar.post("/v1/batch", {"batch": mixed_batch()})
    assert answer.status == 200, answer.body
    assert answer.body["accepted"] == 20 and answer.body["duplicates"] == 0 and answer.body["success"] is True
    (rejected,) = answer.body["rejected"]
    assert (rejected["index"], rejected["field"]) == (7, "timestamp") and "in the past" in rejected["reason"]
    assert "1 of 21 events are invalid" in answer.body["message"]
    assert await kind_totals(redis_client, keys, "d") == {"e0": 7, "e1": 7, "e2": 6}
    assert sidecar.metrics.events_rejected.labels("timestamp_past")._value.get() == 1
    assert sidecar.metrics.events_accepted._value.get() == 20


async def test_dedup_still_applies_to_the_accepted_events(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    first = await sidecar.post("/v1/batch", {"batch": mixed_batch()})
    again = await sidecar.post("/v1/batch", {"batch": mixed_batch()})  # an SDK resending the batch
    assert (first.body["accepted"], first.body["duplicates"]) == (20, 0)
    assert (again.body["accepted"], again.body["duplicates"]) == (0, 20)
    assert len(again.body["rejected"]) == 1
    assert sum((await kind_totals(redis_client, keys, "d")).values()) == 20


async def test_every_reason_is_listed_per_event(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                keys: PipelineKeys) -> None:
    body = [{"event": "ok"}, {"event": ""}, {"event": "ok", "user_id": 7, "message_id": 8}, 3,
            {"event": "ok", "timestamp": _iso(timedelta(hours=1))}, {"event": "ok", "type": "nope"}]
    answer = await sidecar.post("/v1/events", body)
    assert answer.status == 200
    assert answer.body["accepted"] == 1
    listed = [(e["index"], e["field"]) for e in answer.body["rejected"]]
    assert listed == [(1, "event"), (2, "user_id"), (2, "message_id"), (3, "(event)"), (4, "timestamp"),
                      (5, "type")]
    assert "success" not in answer.body  # /v1/events speaks our protocol only
    reasons = {reason: sidecar.metrics.events_rejected.labels(reason)._value.get()
               for reason in ("event_name", "user_id", "message_id", "not_an_object", "timestamp_future",
                              "call_type")}
    assert reasons == {"event_name": 1, "user_id": 1, "message_id": 0, "not_an_object": 1, "timestamp_future": 1,
                       "call_type": 1}  # each event once, by its first reason
    assert await kind_totals(redis_client, keys, "d") == {"ok": 1}


async def test_nothing_valid_is_400_and_nothing_counted(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                        keys: PipelineKeys) -> None:
    answer = await sidecar.post("/v1/batch", {"batch": [{"event": ""}, {"type": "track"}]})
    assert answer.status == 400
    assert answer.body["error"] == "invalid_events" and answer.body["code"] == "invalid_events"
    assert "nothing of this request was counted" in answer.body["message"]
    assert [e["index"] for e in answer.body["errors"]] == [0, 1]
    assert await pipeline_keys(redis_client, keys) == []


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b'{"batch": [{"event": "a"}, ', 400, "invalid_json"),
    (b'{"batch": ' + b'[' + b'{"event": "a"},' * 3000 + b'{"event": "a"}]}', 413, "payload_too_large"),
])
async def test_an_unreadable_or_oversized_request_counts_nothing(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, raw: bytes, status: int,
        code: str) -> None:
    answer = await sidecar.post("/v1/batch", raw=raw)
    assert (answer.status, answer.body["error"]) == (status, code)
    assert await pipeline_keys(redis_client, keys) == []


async def test_an_event_over_the_size_limit_is_rejected_alone(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"max_event_bytes": 1024}))
    answer = await sidecar.post("/v1/batch", {"batch": [{"event": "a"}, {"event": "a", "properties": {
        "blob": "x" * 2000}}]})
    assert answer.status == 200 and answer.body["accepted"] == 1
    assert answer.body["rejected"][0]["index"] == 1 and "bytes" in answer.body["rejected"][0]["reason"]
    assert sidecar.metrics.events_rejected.labels("too_large")._value.get() == 1
    assert await kind_totals(redis_client, keys, "d") == {"a": 1}


async def test_all_or_nothing_refuses_the_whole_batch(
        start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    sidecar = await start_sidecar(sidecar_config(ingest={"all_or_nothing": True}))
    answer = await sidecar.post("/v1/batch", {"batch": mixed_batch()})
    assert answer.status == 400
    assert answer.body["errors"][0]["index"] == 7
    assert "nothing of this request was counted" in answer.body["message"]
    assert await pipeline_keys(redis_client, keys) == []
    assert sidecar.metrics.events_refused.labels("invalid_events")._value.get() == 21


async def test_a_partial_batch_whose_write_fails_is_503_and_nothing_counted(
        start_sidecar: SidecarFactory, sidecar_config, private_redis, keys: PipelineKeys) -> None:
    """Acked means stored holds for partial batches: their valid events are one atomic write like any other."""
    import asyncio

    sidecar = await start_sidecar(sidecar_config(redis_url=private_redis.url,
                                                 server={"redis_timeout_seconds": 0.3}))
    await asyncio.to_thread(private_redis.stop)
    answer = await sidecar.post("/v1/batch", {"batch": mixed_batch()})
    assert answer.status == 503 and "rejected" not in answer.body
    assert answer.body["code"] == "redis_unavailable" and answer.body["detail"]
    assert sidecar.metrics.events_accepted._value.get() == 0
    assert sidecar.metrics.events_rejected.labels("timestamp_past")._value.get() == 0  # only for stored answers
    await asyncio.to_thread(private_redis.start)
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        retried = await sidecar.post("/v1/batch", {"batch": mixed_batch()})
        assert (retried.status, retried.body["accepted"], len(retried.body["rejected"])) == (200, 20, 1)
        assert sum((await kind_totals(client, keys, "d")).values()) == 20
    finally:
        await client.aclose()
