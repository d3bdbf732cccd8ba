"""Fixtures for sidecar tests: real sidecar servers on free ports and private Redis servers."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from support import make_config, unregister_pipeline

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.sidecar.app import create_app

# Test modules here import sidecar_helpers (a unique name, so nothing else is shadowed).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sidecar_helpers import Sidecar, SidecarFactory


@pytest.fixture
def sidecar_config(pipeline: str, redis_url: str, database_url: str) -> Callable[..., Config]:
    """``sidecar_config(ingest={...}, server={...}, redis_url=...)``: a Config for this test's pipeline."""

    def build(redis_url: str = redis_url, **sections: Any) -> Config:
        return make_config(pipeline, redis_url, database_url, **sections)

    return build


@pytest.fixture
async def start_sidecar() -> AsyncIterator[SidecarFactory]:
    """``await start_sidecar(config, **create_app_kwargs)``: a running sidecar, stopped after the test."""
    stack = contextlib.AsyncExitStack()

    async def start(config: Config, **kwargs: Any) -> Sidecar:
        app = create_app(config, **kwargs)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        stack.push_async_callback(server.close)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        stack.push_async_callback(session.close)
        return Sidecar(app, server, session)

    async with stack:
        yield start


@pytest.fixture
async def sidecar(start_sidecar: SidecarFactory, config: Config, redis_client: aioredis.Redis) -> Sidecar:
    """A sidecar with the default config on the shared Redis (the test's keys are cleaned up)."""
    return await start_sidecar(config)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis with AOF (fsync always): it keeps its data across stop()/start()."""
    server = RedisServer(tmp_path / "aof-redis", appendonly=True).start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


@pytest.fixture(autouse=True)
def _unregister_pipeline(redis_url: str, pipeline: str) -> Iterator[None]:
    """Take the test pipeline out of ``ap:pipelines`` afterwards, so ``flush --all`` runs elsewhere skip it."""
    yield
    unregister_pipeline(redis_url, pipeline)
