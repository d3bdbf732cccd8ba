"""The sidecar's read endpoints on a minimal app (REDIS + CONFIG + setup_query_routes), real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from flushkit import LuaWriter
from prometheus_client import CollectorRegistry
from support import make_config

from analytics_pipeline.core.config import Config
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.reads.query_routes import QUERY_GATES, setup_query_routes
from analytics_pipeline.sidecar.appkeys import CONFIG, REDIS, REGISTRY

NOW = datetime.now(UTC)
TODAY = NOW.date()


async def client_for(config: Config, redis_client: aioredis.Redis) -> TestClient:
    app = web.Application()
    app[CONFIG] = config
    app[REDIS] = redis_client
    setup_query_routes(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def http(config: Config, redis_client: aioredis.Redis, pg: asyncpg.Connection) -> AsyncIterator[TestClient]:
    client = await client_for(config, redis_client)
    try:
        yield client
    finally:
        await client.close()


async def seed(writer: LuaWriter, redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config) -> None:
    """Some counts in PostgreSQL and some still live in Redis (same users on both sides)."""
    hour = NOW.replace(minute=0, second=0, microsecond=0)
    await writer.write([("view", "alice", hour), ("view", "bob", hour), ("click", "alice", hour)])
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    await writer.write([("view", "alice", hour), ("view", "carol", hour - timedelta(days=1))])


async def test_counts_day_hour_and_user(http: TestClient, writer: LuaWriter, redis_client: aioredis.Redis,
                                       pg: asyncpg.Connection, config: Config) -> None:
    await seed(writer, redis_client, pg, config)
    response = await http.get("/v1/counts", params={"event": "view"})
    assert response.status == 200
    body = await response.json()
    assert len(body["series"]) == 30 and body["series"][-1] == {"bucket": TODAY.isoformat(), "count": 3}
    assert body["total"] == 4 and body["granularity"] == "day" and body["to"] == TODAY.isoformat()

    hour = NOW.replace(minute=0, second=0, microsecond=0)
    body = await (await http.get("/v1/counts", params={"granularity": "hour"})).json()
    assert len(body["series"]) == 48
    assert body["series"][-1] == {"bucket": hour.strftime("%Y-%m-%dT%H:00:00Z"), "count": 4}
    assert body["total"] == 5

    body = await (await http.get("/v1/counts", params={
        "user_id": "alice", "from": TODAY.isoformat(), "to": TODAY.isoformat()})).json()
    assert body["series"] == [{"bucket": TODAY.isoformat(), "count": 3}] and body["user_id"] == "alice"

    start = (hour - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = await (await http.get("/v1/counts", params={"event": "click", "granularity": "hour", "from": start,
                                                      "to": NOW.isoformat()})).json()
    assert [p["count"] for p in body["series"]] == [0, 1]


async def test_uniques_and_events(http: TestClient, writer: LuaWriter, redis_client: aioredis.Redis,
                                  pg: asyncpg.Connection, config: Config) -> None:
    await seed(writer, redis_client, pg, config)
    yesterday = TODAY - timedelta(days=1)
    body = await (await http.get("/v1/uniques", params={"from": yesterday.isoformat()})).json()
    assert body["series"] == [{"bucket": yesterday.isoformat(), "count": 1}, {"bucket": TODAY.isoformat(), "count": 2}]
    assert body["distinct_total"] == 3
    body = await (await http.get("/v1/uniques", params={"event": "click", "from": TODAY.isoformat()})).json()
    assert body["series"] == [{"bucket": TODAY.isoformat(), "count": 1}]
    body = await (await http.get("/v1/events")).json()
    assert body == {"events": [{"event": "view", "count": 4}, {"event": "click", "count": 1}], "total": 5}
    body = await (await http.get("/v1/events", params={"from": TODAY.isoformat(), "to": TODAY.isoformat()})).json()
    assert body["total"] == 4


@pytest.mark.parametrize(("path", "params", "parameter"), [
    ("/v1/counts", {"granularity": "week"}, "granularity"),
    ("/v1/counts", {"from": "yesterday"}, "from"),
    ("/v1/counts", {"to": "2026-13-01"}, "to"),
    ("/v1/counts", {"from": "2026-11-27", "to": "2026-11-01"}, "to"),
    ("/v1/counts", {"event": ""}, "event"),
    ("/v1/counts", {"user_id": "u", "granularity": "hour"}, "granularity"),
    ("/v1/counts", {"evnt": "view"}, "evnt"),
    ("/v1/counts", {"from": "1900-01-01"}, "from"),
    ("/v1/uniques", {"granularity": "day"}, "granularity"),
    ("/v1/events", {"to": "soon"}, "to"),
])
async def test_bad_parameters_get_400_naming_them(http: TestClient, path: str, params: dict[str, str],
                                                 parameter: str) -> None:
    response = await http.get(path, params=params)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == "invalid_parameter" and body["parameter"] == parameter
    assert body["message"].startswith(f"{parameter}: ")


async def test_postgres_unreachable_is_503_and_ingest_side_untouched(redis_client: aioredis.Redis,
                                                                     config: Config) -> None:
    from analytics_pipeline.core.services import free_port

    down = make_config(config.pipeline, config.redis_url, f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    client = await client_for(down, redis_client)
    try:
        response = await client.get("/v1/counts")
        assert response.status == 503 and response.headers["Retry-After"]
        assert (await response.json())["message"].startswith("PostgreSQL unavailable")
    finally:
        await client.close()


@pytest.mark.parametrize(("params", "parameter"), [
    ({"to": "0001-01-01"}, "to"),  # the default 30 days before it would start before year 1
    ({"to": "0001-01-01T05:00:00Z", "granularity": "hour"}, "to"),
    ({"to": "9999-12-31T23:59:59-05:00"}, "to"),  # year 10000 in UTC
    ({"from": "0001-01-01T00:00:00+01:00", "to": "0001-01-02"}, "from"),  # year 0 in UTC
    ({"from": "9999-12-31T23:00:00-01:00", "granularity": "hour"}, "from"),
    ({"from": "0001-01-01", "to": "9999-12-31"}, "from"),  # 3.6 million days: too many buckets
    ({"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:00:00Z", "granularity": "hour"}, "from"),
    ({"from": "9999-12-31", "to": "0001-01-01"}, "to"),
    ({"from": "2026-11-02", "to": "2026-11-01", "user_id": "u"}, "to"),
])
async def test_extreme_dates_get_400_naming_the_parameter(http: TestClient, params: dict[str, str],
                                                         parameter: str) -> None:
    """Issue 11 case 6: out-of-range dates were an OverflowError (a 5xx that SDKs retry forever)."""
    for path in ("/v1/counts", "/v1/uniques"):
        if path == "/v1/uniques" and {"granularity", "user_id"} & params.keys():
            continue
        response = await http.get(path, params=params)
        body = await response.json()
        assert response.status == 400, (path, body)
        assert body["error"] == "invalid_parameter" and body["parameter"] == parameter, body
        assert body["message"].startswith(f"{parameter}: ") and len(body["message"]) > len(parameter) + 10


@pytest.mark.parametrize(("params", "status", "parameter"), [
    ({"to": "9999-12-31T23:59:59-05:00"}, 400, "to"),
    ({"from": "0001-01-01T00:00:00+01:00"}, 400, "from"),
    ({"from": "9999-12-31", "to": "0001-01-01"}, 400, "to"),
    ({"from": "0001-01-01"}, 200, None),  # all time from year 1: live buckets are only looked for recently
    ({"from": "0001-01-01", "to": "9999-12-31"}, 200, None),
    ({"to": "0001-01-01"}, 200, None),
])
async def test_events_accepts_any_valid_range_and_refuses_overflow(http: TestClient, writer: LuaWriter,
                                                                  params: dict[str, str], status: int,
                                                                  parameter: str | None) -> None:
    await writer.write([("view", "alice", NOW)])
    response = await http.get("/v1/events", params=params)
    body = await response.json()
    assert response.status == status, body
    if parameter is None:
        assert body["total"] == (0 if params.get("to") == "0001-01-01" else 1)
    else:
        assert body["parameter"] == parameter


async def gated_client(config: Config, redis_client: aioredis.Redis, **queries: object) -> TestClient:
    """The read endpoints with ``queries`` settings and a Prometheus registry of their own."""
    app = web.Application()
    app[CONFIG] = config.replace(queries=queries)
    app[REDIS] = redis_client
    app[REGISTRY] = CollectorRegistry()
    setup_query_routes(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_heavy_queries_beyond_the_limit_get_429_with_retry_after(
        config: Config, redis_client: aioredis.Redis, pg: asyncpg.Connection, writer: LuaWriter) -> None:
    """At most queries.max_concurrent per-user/uniques queries run at once; the next one is refused with
    429, Retry-After and a JSON body, cheap queries are not held back, and a freed slot serves again."""
    await writer.write([("view", "alice", NOW)])
    client = await gated_client(config, redis_client, max_concurrent=2, wait_seconds=0, retry_after_seconds=7)
    try:
        gates = client.app[QUERY_GATES]
        for kind, path, params in (("uniques", "/v1/uniques", {}), ("user_counts", "/v1/counts", {"user_id": "alice"})):
            assert await gates[kind].enter(2, 0) and await gates[kind].enter(2, 0)  # two of that kind running
            response = await client.get(path, params=params)
            assert response.status == 429 and response.headers["Retry-After"] == "7"
            body = await response.json()
            assert body["error"] == "too_many_queries" and "queries.max_concurrent" in body["message"]
            assert (await client.get("/v1/counts")).status == 200  # not per-user: not gated
            assert (await client.get("/v1/events")).status == 200
            await gates[kind].leave()
            response = await client.get(path, params=params)
            assert response.status == 200, await response.text()
            assert gates[kind].running == 1  # the query gave its slot back
        response = await client.get("/v1/uniques")
        assert response.status == 200 and (await response.json())["distinct_total"] == 1
        registry = client.app[REGISTRY]
        for kind in ("uniques", "user_counts"):
            assert registry.get_sample_value("analytics_sidecar_queries_refused_total", {"kind": kind}) == 1
    finally:
        await client.close()


async def test_a_heavy_query_waits_for_a_slot_within_wait_seconds(
        config: Config, redis_client: aioredis.Redis, pg: asyncpg.Connection, writer: LuaWriter) -> None:
    await writer.write([("view", "alice", NOW)])
    client = await gated_client(config, redis_client, max_concurrent=1, wait_seconds=60)
    try:
        gate = client.app[QUERY_GATES]["uniques"]
        assert await gate.enter(1, 0)
        waiting = asyncio.ensure_future(client.get("/v1/uniques", params={"from": TODAY.isoformat()}))
        for _ in range(6000):  # until the request waits for the slot (it is not refused meanwhile)
            if gate.waiting:
                break
            await asyncio.sleep(0.01)
        assert gate.waiting == 1 and not waiting.done()
        await gate.leave()
        response = await waiting
        assert response.status == 200 and (await response.json())["distinct_total"] == 1
    finally:
        await client.close()
