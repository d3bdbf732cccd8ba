"""Shared fixtures: real Redis and PostgreSQL (the machine's, or throwaway ones), one pipeline per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from support import make_config

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisClusterServers, RedisServer, Services, local_services


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """Redis + PostgreSQL for the whole run: REDIS_URL/DATABASE_URL if they answer, else throwaway."""
    with local_services() as found:
        print(f"\n[services] {found.describe()}")
        yield found


@pytest.fixture(scope="session")
def redis_url(services: Services) -> str:
    return services.redis_url


@pytest.fixture(scope="session")
def database_url(services: Services) -> str:
    return services.database_url


@pytest.fixture
def pipeline() -> str:
    """A pipeline name of this test alone, so tests never see each other's keys or rows."""
    return f"test/p-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(pipeline: str) -> PipelineKeys:
    return PipelineKeys(pipeline)


@pytest.fixture
def config(pipeline: str, redis_url: str, database_url: str) -> Config:
    return make_config(pipeline, redis_url, database_url)


async def _delete_pipeline_keys(client: aioredis.Redis, keys: PipelineKeys) -> None:
    batch = [key async for key in client.scan_iter(match=keys.scan_pattern, count=1000)]
    for start in range(0, len(batch), 500):
        await client.delete(*batch[start:start + 500])


@pytest.fixture
async def redis_client(redis_url: str, keys: PipelineKeys) -> AsyncIterator[aioredis.Redis]:
    """A decoded async client; the test pipeline's keys are removed afterwards."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await _delete_pipeline_keys(client, keys)
        await client.aclose()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone, for tests that stop, pause or crash it."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of this test alone: 3 masters, 3 replicas, on loopback (tests may kill or reshard it)."""
    cluster = RedisClusterServers(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        for node in cluster.nodes:
            node.resume()
        cluster.stop()
