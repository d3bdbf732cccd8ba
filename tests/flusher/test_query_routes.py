"""The sidecar's read endpoints on a minimal app (REDIS + CONFIG + setup_query_routes), real Redis and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from flushkit import LuaWriter
from support import make_config

from analytics_pipeline.core.config import Config
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.sidecar.appkeys import CONFIG, REDIS
from analytics_pipeline.sidecar.query_routes import setup_query_routes

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
