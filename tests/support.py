"""Helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from analytics_pipeline.core.config import Config, parse_config
from analytics_pipeline.core.services import RedisServer, free_port

REPO = Path(__file__).resolve().parents[1]


def make_config(pipeline: str, redis_url: str, database_url: str, **sections: Any) -> Config:
    """A validated Config for tests; ``sections`` (e.g. ``ingest={...}``) are merged over the defaults."""
    return parse_config({"pipeline": pipeline, "redis_url": redis_url, "database_url": database_url, **sections})


def run_demo(redis_url: str, database_url: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """The demo as ``make demo`` runs it (plus quick, JSON, a free port); returns the process and its summary."""
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
    env.pop("ANALYTICS_CONFIG", None)
    command = Path(sys.executable).parent / "analytics-pipeline"  # the console script `make demo` runs
    result = subprocess.run([str(command), "demo", "--quick", "--json",
                             "--port", str(free_port()), *extra],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"stdout must be one JSON object:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result, orjson.loads(lines[0])


def ensure_schema(database_url: str) -> str:
    """Apply the schema when something of it is missing; returns ``database_url`` (for session fixtures).

    Only when missing: re-running CREATE INDEX IF NOT EXISTS takes table locks that can deadlock with
    other sessions' flush transactions on the shared database."""
    import asyncpg

    from analytics_pipeline.flusher.migrate import apply_schema, schema_objects

    async def migrate() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            names = [name for _, name in schema_objects()]
            found = await conn.fetchval("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = "
                                        "c.relnamespace WHERE n.nspname = current_schema() AND "
                                        "c.relname = ANY($1::text[])", names)
            if found != len(names):
                await apply_schema(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    return database_url


def unregister_pipeline(redis_url: str, pipeline: str) -> None:
    """Take a test pipeline out of ``ap:pipelines``, so ``flush --all`` runs elsewhere skip it."""
    import redis

    from analytics_pipeline.core.keys import PIPELINES_SET

    client = redis.Redis.from_url(redis_url)
    try:
        client.srem(PIPELINES_SET, pipeline)
    finally:
        client.close()


def flush_env(config: Config, **extra: str) -> dict[str, str]:
    """Environment for a flusher subprocess pointed at the config's Redis and PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if k not in ("ANALYTICS_FLUSH_FAULT", "ANALYTICS_CONFIG")}
    env.update(REDIS_URL=config.redis_url, DATABASE_URL=config.database_url, ANALYTICS_PIPELINE=config.pipeline)
    env.update(extra)
    return env


async def run_cli_async(args: Sequence[str], env: dict[str, str], limit_s: float = 60) -> tuple[int, str, str]:
    """``python -m analytics_pipeline <args>`` without blocking the event loop: (returncode, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analytics_pipeline", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), limit_s)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@contextlib.contextmanager
def throwaway_redis(folder: Path, *args: str) -> Iterator[RedisServer]:
    """A redis-server of one test with extra options (``--maxmemory``, ``--maxmemory-policy``, ``--rename-command``):
    the place for settings that must never be CONFIG SET on the shared Redis."""
    server = RedisServer(folder / "redis", extra_args=args).start()
    try:
        yield server
    finally:
        server.stop()


def fresh_ttls(ttl_seconds: int, since: float) -> range:
    """The TTLs (whole seconds) a key given ``ttl_seconds`` after ``time.monotonic()`` was ``since`` can show now:
    the time the test really took widens the window, so a slow or loaded machine does not fail the check."""
    elapsed = math.ceil(time.monotonic() - since)
    return range(ttl_seconds - elapsed - 1, ttl_seconds + 1)
