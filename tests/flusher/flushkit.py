"""Test helpers for the flusher and query tests: a writer that does exactly what the sidecar does, the
expected totals it acknowledged, and readers of PostgreSQL totals and Redis leftovers.

``LuaWriter`` is the stand-in for the sidecar's group-commit writer: one atomic Lua script per write
(HINCRBY + EXPIRE per bucket, ZADD dirty NX now_ms, SADD ap:pipelines). Anything with the same
``write(events)`` coroutine (acked when it returns) and ``expected`` counter can replace it.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import KIND_OF_GRANULARITY, PIPELINES_SET, PipelineKeys, user_field
from analytics_pipeline.flusher.store import PIPELINE_TABLES

# (kind, event_type, bucket start) for d/h; ("u", event_type, day, user_id) for per-user rows.
CounterKey = tuple[Any, ...]

WRITE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 3, #ARGV, 3 do
  redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2])
  redis.call('EXPIRE', ARGV[i], ARGV[1])
  redis.call('ZADD', KEYS[1], 'NX', now, ARGV[i])
end
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


class Writer(Protocol):
    """What the tests need from a writer: ``write`` returns once the events are acked (stored)."""

    expected: Counter[CounterKey]

    async def write(self, events: Sequence[tuple[str, str | None, datetime]]) -> None: ...


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def increments(config: Config, events: Iterable[tuple[str, str | None, datetime]]) -> Counter[CounterKey]:
    """The counters a batch of ``(event_type, user_id, timestamp)`` adds, keyed like PostgreSQL rows."""
    kinds = {KIND_OF_GRANULARITY[g] for g in config.counters.granularities}
    out: Counter[CounterKey] = Counter()
    for event_type, user_id, moment in events:
        moment = moment.astimezone(UTC)
        if "d" in kinds:
            out["d", event_type, moment.date()] += 1
        if "h" in kinds:
            out["h", event_type, _hour(moment)] += 1
        if "u" in kinds and user_id is not None:
            out["u", event_type, moment.date(), user_id] += 1
    return out


class LuaWriter:
    """Counts events into live Redis buckets exactly as the sidecar does, and remembers what was acked."""

    def __init__(self, client: aioredis.Redis, config: Config) -> None:
        self.client = client
        self.config = config
        self.keys = PipelineKeys(config.pipeline)
        self.expected: Counter[CounterKey] = Counter()
        self._script = client.register_script(WRITE_LUA)

    def increments(self, events: Iterable[tuple[str, str | None, datetime]]) -> Counter[CounterKey]:
        return increments(self.config, events)

    def _args(self, increments: Counter[CounterKey]) -> list[Any]:
        args: list[Any] = [self.config.counters.ttl_seconds, self.config.pipeline]
        for key, count in increments.items():
            if key[0] == "d":
                args += [self.keys.daily(key[2]), key[1], count]
            elif key[0] == "h":
                args += [self.keys.hourly(key[2]), key[1], count]
            else:
                args += [self.keys.user_daily(key[2]), user_field(key[1], key[3]), count]
        return args

    async def write(self, events: Sequence[tuple[str, str | None, datetime]]) -> None:
        increments = self.increments(events)
        await self._script(keys=[self.keys.dirty, PIPELINES_SET], args=self._args(increments))
        self.expected.update(increments)  # acked: the script returned


class SidecarWriter:
    """Writes through the REAL sidecar (``create_app`` served on a loopback port): acked = HTTP 200."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.expected: Counter[CounterKey] = Counter()
        self._server: Any = None
        self._session: Any = None

    async def start(self) -> SidecarWriter:
        import aiohttp
        from aiohttp.test_utils import TestServer

        from analytics_pipeline.sidecar.app import create_app

        self._server = TestServer(create_app(self.config))
        await self._server.start_server()
        self._session = aiohttp.ClientSession(str(self._server.make_url("")))
        return self

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._server is not None:
            await self._server.close()

    async def write(self, events: Sequence[tuple[str, str | None, datetime]]) -> None:
        body = [{"event": e, **({"user_id": u} if u is not None else {}),
                 "timestamp": t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")} for e, u, t in events]
        async with self._session.post("/v1/batch", json={"batch": body}) as response:
            text = await response.text()
            assert response.status == 200, (response.status, text)
        self.expected.update(increments(self.config, events))


async def pg_counters(conn: asyncpg.Connection, pipeline: str) -> Counter[CounterKey]:
    """Everything PostgreSQL holds for a pipeline, keyed like ``LuaWriter.expected``."""
    out: Counter[CounterKey] = Counter()
    for row in await conn.fetch("SELECT event_type, day, count FROM analytics_daily WHERE pipeline = $1", pipeline):
        out["d", row["event_type"], row["day"]] = row["count"]
    for row in await conn.fetch("SELECT event_type, hour, count FROM analytics_hourly WHERE pipeline = $1",
                                pipeline):
        out["h", row["event_type"], row["hour"]] = row["count"]
    for row in await conn.fetch(
            "SELECT event_type, day, user_id, count FROM analytics_user_daily WHERE pipeline = $1", pipeline):
        out["u", row["event_type"], row["day"], row["user_id"]] = row["count"]
    return out


async def redis_leftovers(client: aioredis.Redis, keys: PipelineKeys) -> dict[str, list[str]]:
    """Protocol state that must be empty after a clean run: staging keys, unit sets, in-flight units, dirty."""
    staging = [k async for k in client.scan_iter(match=keys.scan_pattern.replace("*", "s:*"), count=1000)]
    units = [k async for k in client.scan_iter(match=keys.scan_pattern.replace("*", "unit:*"), count=1000)]
    return {"staging": sorted(staging), "units": sorted(units),
            "inflight": await client.zrange(keys.inflight, 0, -1), "dirty": await client.zrange(keys.dirty, 0, -1)}


def assert_clean(leftovers: dict[str, list[str]]) -> None:
    """No staging key, unit set, in-flight unit or dirty bucket left."""
    assert leftovers == {"staging": [], "units": [], "inflight": [], "dirty": []}, leftovers


def run_cli(args: Sequence[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m analytics_pipeline <args>`` as a subprocess (blocking)."""
    return subprocess.run([sys.executable, "-m", "analytics_pipeline", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


TABLES = PIPELINE_TABLES


async def delete_pipeline_rows(conn: asyncpg.Connection, pipeline: str) -> None:
    """Remove every row of a test pipeline (tests share one database)."""
    for table in TABLES:
        await conn.execute(f"DELETE FROM {table} WHERE pipeline = $1", pipeline)


# The uniques rollups recomputed from scratch out of analytics_user_daily: what the flusher's
# incremental maintenance must always equal (schema.sql's back-fill computes them the same way).
_TRUE_LAST_SEEN = """
SELECT event_type, user_id, max(day) AS last_day FROM analytics_user_daily WHERE pipeline = $1
 GROUP BY event_type, user_id
UNION ALL
SELECT '', user_id, max(day) FROM analytics_user_daily WHERE pipeline = $1 GROUP BY user_id
"""
_TRUE_UNIQUES = """
SELECT event_type, day, count(*) AS users FROM analytics_user_daily WHERE pipeline = $1 GROUP BY event_type, day
UNION ALL
SELECT '', day, count(DISTINCT user_id) FROM analytics_user_daily WHERE pipeline = $1 GROUP BY day
"""


async def rollup_state(conn: asyncpg.Connection, pipeline: str) -> dict[str, dict[tuple[Any, ...], int]]:
    """The rollups as stored: users per (event, day), last_seen_users per (event, day), last day per user."""
    uniques = await conn.fetch("SELECT event_type, day, users, last_seen_users FROM analytics_daily_uniques "
                               "WHERE pipeline = $1", pipeline)
    seen = await conn.fetch("SELECT event_type, user_id, last_day FROM analytics_user_last_seen WHERE pipeline = $1",
                            pipeline)
    return {"users": {(r["event_type"], r["day"]): r["users"] for r in uniques if r["users"]},
            "last_seen_users": {(r["event_type"], r["day"]): r["last_seen_users"]
                                for r in uniques if r["last_seen_users"]},
            "last_day": {(r["event_type"], r["user_id"]): r["last_day"].toordinal() for r in seen}}


async def true_rollups(conn: asyncpg.Connection, pipeline: str) -> dict[str, dict[tuple[Any, ...], int]]:
    """What the rollups must hold, recomputed from the per-user rows."""
    seen = await conn.fetch(_TRUE_LAST_SEEN, pipeline)
    histogram: Counter[tuple[Any, ...]] = Counter((r["event_type"], r["last_day"]) for r in seen)
    return {"users": {(r["event_type"], r["day"]): r["users"] for r in await conn.fetch(_TRUE_UNIQUES, pipeline)},
            "last_seen_users": dict(histogram),
            "last_day": {(r["event_type"], r["user_id"]): r["last_day"].toordinal() for r in seen}}


async def assert_rollups_exact(conn: asyncpg.Connection, pipeline: str) -> None:
    """The flusher-maintained rollups equal a recomputation from analytics_user_daily."""
    stored, truth = await rollup_state(conn, pipeline), await true_rollups(conn, pipeline)
    for part in ("users", "last_seen_users", "last_day"):
        assert stored[part] == truth[part], (part, stored[part], truth[part])


def today() -> date:
    return datetime.now(UTC).date()
