"""Every route real SDKs post to answers 200 once stored, with the keys each protocol's clients read.

Segment's and RudderStack's Python clients treat only 200 as success and read ``code``/``message``
of an error; PostHog's read ``detail``; ``"success": true`` / ``"status": 1`` is what the real
services send on success. (The SDKs themselves are driven in the sdk-harness tests.)
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from sidecar_helpers import Sidecar, kind_totals

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.ingest import ROUTES

SEGMENT_SINGLE = {
    # path: (body without "type", the event it is counted as; None: acknowledged, not counted)
    "/v1/track": ({"event": "Signed Up", "userId": "u1"}, "Signed Up"),
    "/v1/t": ({"event": "Signed Up", "userId": "u1"}, "Signed Up"),
    "/v1/page": ({"name": "Home", "anonymousId": "a1"}, "page_view"),
    "/v1/p": ({"name": "Home", "anonymousId": "a1"}, "page_view"),
    "/v1/screen": ({"name": "Main", "userId": "u1"}, "screen_view"),
    "/v1/s": ({"name": "Main", "userId": "u1"}, "screen_view"),
    "/v1/identify": ({"userId": "u1", "traits": {"plan": "pro"}}, None),
    "/v1/i": ({"userId": "u1", "traits": {}}, None),
    "/v1/group": ({"userId": "u1", "groupId": "g1"}, None),
    "/v1/g": ({"userId": "u1", "groupId": "g1"}, None),
    "/v1/alias": ({"userId": "u1", "previousId": "a1"}, None),
    "/v1/a": ({"userId": "u1", "previousId": "a1"}, None),
}
POSTHOG_ANY = ["/capture", "/capture/", "/e", "/e/", "/i/v0/e", "/i/v0/e/", "/track", "/track/"]


def today(keys: PipelineKeys) -> str:
    return keys.daily(datetime.now(UTC))


def test_every_route_is_listed_in_the_docs() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "http-api.md").read_text(encoding="utf-8")
    readme = (root / "README.md").read_text(encoding="utf-8")
    for route in ROUTES:
        assert f"`{route.path}`" in docs, route.path
        assert f"`{route.path}`" in readme, route.path


@pytest.mark.parametrize("path", sorted(SEGMENT_SINGLE))
async def test_segment_single_calls_take_their_type_from_the_route(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, path: str) -> None:
    body, counted_as = SEGMENT_SINGLE[path]
    answer = await sidecar.post(path, body)
    assert answer.status == 200, answer.body
    assert answer.body["success"] is True
    if counted_as is None:
        assert answer.body == {"accepted": 0, "duplicates": 0, "not_counted": 1, "success": True}
        assert await redis_client.hgetall(today(keys)) == {}
    else:
        assert answer.body == {"accepted": 1, "duplicates": 0, "success": True}
        assert await redis_client.hgetall(today(keys)) == {counted_as: "1"}


async def test_a_call_type_in_the_body_wins_over_the_route(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    answer = await sidecar.post("/v1/t", {"type": "page", "anonymousId": "a1"})
    assert answer.status == 200 and answer.body["accepted"] == 1
    assert await redis_client.hgetall(today(keys)) == {"page_view": "1"}


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
async def test_segment_batches(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys,
                               path: str) -> None:
    batch = {"batch": [{"type": "track", "event": "Clicked", "userId": "u1"}, {"type": "page", "userId": "u2"},
                       {"type": "screen", "userId": "u3"}, {"type": "identify", "userId": "u1"},
                       {"type": "group", "userId": "u1", "groupId": "g"}, {"type": "alias", "userId": "u1"}]}
    answer = await sidecar.post(path, batch)
    assert answer.status == 200
    assert answer.body == {"accepted": 3, "duplicates": 0, "not_counted": 3, "success": True}
    assert await redis_client.hgetall(today(keys)) == {"Clicked": "1", "page_view": "1", "screen_view": "1"}


@pytest.mark.parametrize("path", POSTHOG_ANY)
async def test_posthog_capture_routes_take_one_event_a_list_or_a_batch(
        sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, path: str) -> None:
    one = {"api_key": "phc_x", "event": "$pageview", "distinct_id": "u1", "properties": {}}
    many = [{"event": "clicked", "properties": {"distinct_id": "u2", "token": "phc_x"}}]
    batch = {"api_key": "phc_x", "batch": [{"event": "signed_up", "distinct_id": "u3"}]}
    for body in (one, many, batch):
        answer = await sidecar.post(path, body)
        assert answer.status == 200, answer.body
        assert answer.body == {"accepted": 1, "duplicates": 0, "status": 1}
    assert await redis_client.hgetall(today(keys)) == {"$pageview": "1", "clicked": "1", "signed_up": "1"}


@pytest.mark.parametrize("path", ["/batch", "/batch/"])
async def test_posthog_batch(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys, path: str) -> None:
    body = {"api_key": "phc_x", "batch": [
        {"event": "$pageview", "distinct_id": "u1", "uuid": "0190-1"},
        {"event": "$identify", "distinct_id": "u1", "properties": {"$set": {"plan": "pro"}}},
        {"event": "$set", "distinct_id": "u1"}, {"event": "$create_alias", "distinct_id": "u1"},
        {"event": "$groupidentify", "distinct_id": "u1"}]}
    answer = await sidecar.post(path, body)
    assert answer.body == {"accepted": 1, "duplicates": 0, "not_counted": 4, "status": 1}
    assert await redis_client.hgetall(today(keys)) == {"$pageview": "1"}
    metric = sidecar.metrics.events_not_counted
    assert {name: metric.labels(name)._value.get() for name in ("$identify", "$set", "$create_alias")} == {
        "$identify": 1, "$set": 1, "$create_alias": 1}


@pytest.mark.parametrize("path", ["/engage", "/engage/"])
async def test_posthog_engage_is_an_identify(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys,
                                             path: str) -> None:
    answer = await sidecar.post(path, {"$set": {"email": "x@y"}, "$token": "phc_x", "$distinct_id": "u1"})
    assert answer.status == 200
    assert answer.body == {"accepted": 0, "duplicates": 0, "not_counted": 1, "status": 1}
    assert sidecar.metrics.events_not_counted.labels("$identify")._value.get() == 1
    assert await redis_client.hgetall(today(keys)) == {}


async def test_posthog_capture_v1(sidecar: Sidecar, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    now = datetime.now(UTC).isoformat()
    body = {"created_at": now, "batch": [
        {"event": "$pageview", "uuid": "0190-a", "distinct_id": "u1", "timestamp": now, "options": {},
         "properties": {}},
        {"event": "bad", "uuid": "0190-b", "distinct_id": "u1", "timestamp": "yesterday", "options": {},
         "properties": {}}]}
    answer = await sidecar.post("/i/v1/analytics/events", body, headers={"Authorization": "Bearer phc_x"})
    assert answer.status == 200, answer.body
    assert answer.body["status"] == 1 and answer.body["accepted"] == 1
    # The client resends events marked "retry", reports "drop", and takes absent uuids as accepted.
    assert answer.body["results"] == {"0190-b": {"result": "drop", "details": answer.body["results"]["0190-b"][
        "details"]}}
    assert "timestamp" in answer.body["results"]["0190-b"]["details"]
    assert await redis_client.hgetall(today(keys)) == {"$pageview": "1"}
    clean = await sidecar.post("/i/v1/analytics/events", {"batch": body["batch"][:1]})
    assert clean.body == {"accepted": 0, "duplicates": 1, "status": 1, "results": {}}


@pytest.mark.parametrize(("path", "keys_read"), [
    ("/v1/batch", ("code", "message")), ("/v1/track", ("code", "message")), ("/batch/", ("detail",)),
    ("/i/v1/analytics/events", ("detail", "error")), ("/v1/events", ("error", "message"))])
async def test_errors_carry_what_each_client_reads(sidecar: Sidecar, path: str, keys_read: tuple[str, ...]) -> None:
    answer = await sidecar.post(path, raw=b"{not json")
    assert answer.status == 400
    for key in keys_read:
        assert isinstance(answer.body[key], str) and answer.body[key], (key, answer.body)
    assert answer.body["code"] == answer.body["error"] == "invalid_json"
    assert answer.body["detail"] == answer.body["message"]


async def test_stored_requests_answer_200_not_202(sidecar: Sidecar, redis_client: aioredis.Redis,
                                                  keys: PipelineKeys) -> None:
    for route in ROUTES:
        body = {"batch": [{"event": "e", "userId": "u"}]} if route.shape == "batch" else {"event": "e"}
        answer = await sidecar.post(route.path, body)
        assert answer.status == 200, (route.path, answer.body)
        assert answer.headers["Content-Type"] == "application/json"
    assert await kind_totals(redis_client, keys, "d") == {"e": len(ROUTES)}  # named events count on any route
