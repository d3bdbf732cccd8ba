"""Fixtures of the real-SDK tests: a sidecar on a real loopback port that logs every answer it gives,
the PostgreSQL schema for the query path, and the npm SDKs installed with ``npm ci``."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from support import REPO, ensure_schema, make_config, unregister_pipeline

from analytics_pipeline.core.config import Config
from analytics_pipeline.sidecar.app import create_app

# Test modules here import sdk_support (a unique name, so nothing else is shadowed).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdk_support import SDK_DIR, LiveSidecar, answer_log


@pytest.fixture(scope="session")
def schema(database_url: str) -> str:
    """The schema applied once per session when something is missing (the query path reads PostgreSQL)."""
    return ensure_schema(database_url)


@pytest.fixture
def sdk_config(pipeline: str, redis_url: str, schema: str) -> Callable[..., Config]:
    """``sdk_config(ingest={...})``: this test's pipeline, defaults otherwise (the SDKs' view of a fresh install)."""

    def build(**sections: Any) -> Config:
        return make_config(pipeline, redis_url, schema, **sections)

    return build


@pytest.fixture
async def start_sidecar(redis_client: aioredis.Redis) -> AsyncIterator[Callable[[Config], Any]]:
    """``await start_sidecar(config)``: a real sidecar on a free loopback port, stopped after the test.

    Every answer it gives is logged (``sidecar.answers``), so a test sees each request an SDK made,
    the status and the body it got back, without touching what the SDK sends."""
    stack = contextlib.AsyncExitStack()

    async def start(config: Config) -> LiveSidecar:
        app = create_app(config)
        answers: list[Any] = []
        app.middlewares.append(answer_log(answers))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        stack.push_async_callback(server.close)
        return LiveSidecar(app, server, answers)

    async with stack:
        yield start


@pytest.fixture(autouse=True)
def _unregister_pipeline(redis_url: str, pipeline: str) -> Iterator[None]:
    """Take the test pipeline out of ``ap:pipelines`` afterwards, so ``flush --all`` runs elsewhere skip it."""
    yield
    unregister_pipeline(redis_url, pipeline)


@pytest.fixture(scope="session")
def node_sdks() -> Path:
    """tests/sdk/node_modules installed from package-lock.json with ``npm ci`` (once; again when the lock
    changes). Without node/npm the Node SDK tests are skipped, except in CI (CI=true), where that fails:
    .ci/run installs npm, so a missing one there is a broken set-up, not a reason to test less."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = "node" if node is None else "npm"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed; .ci/run installs Debian's npm (which brings node)")
        pytest.skip(f"{missing} is not installed: the Node SDK tests need it (apt-get install npm)")
    lock = SDK_DIR / "package-lock.json"
    stamp = SDK_DIR / "node_modules" / ".package-lock.json"  # written by npm ci
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        cache = REPO / ".cache" / "npm"
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--cache", str(cache)],
                                cwd=SDK_DIR, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"npm ci in {SDK_DIR} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return SDK_DIR / "node_modules"
