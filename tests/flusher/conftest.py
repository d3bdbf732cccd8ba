"""Fixtures for flusher and query tests: schema applied once, a PostgreSQL connection, a sidecar-like writer.

Each test's rows (by its unique pipeline) and its ``ap:pipelines`` membership are removed afterwards.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).parent))

from flushkit import LuaWriter, delete_pipeline_rows

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PIPELINES_SET
from analytics_pipeline.flusher.migrate import apply_schema


@pytest.fixture(scope="session")
def schema(database_url: str) -> str:
    """The schema applied (idempotent) once per session; returns the database URL."""

    async def migrate() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await apply_schema(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    return database_url


@pytest.fixture
async def pg(schema: str, pipeline: str) -> AsyncIterator[asyncpg.Connection]:
    """A PostgreSQL connection (UTC session); this test's pipeline rows are deleted afterwards."""
    conn = await asyncpg.connect(schema, server_settings={"timezone": "UTC"})
    try:
        yield conn
    finally:
        await delete_pipeline_rows(conn, pipeline)
        await conn.close()


@pytest.fixture
async def writer(redis_client: aioredis.Redis, config: Config) -> AsyncIterator[LuaWriter]:
    """The sidecar stand-in for this test's pipeline (removed from ap:pipelines afterwards)."""
    yield LuaWriter(redis_client, config)
    await redis_client.srem(PIPELINES_SET, config.pipeline)
