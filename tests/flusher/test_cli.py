"""The commands as an operator runs them: flush output and exit codes, migrate, query, pushgateway."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from flushkit import LuaWriter, delete_pipeline_rows, pg_counters
from support import flush_env, make_config, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisServer, free_port

NOW = datetime.now(UTC)
TODAY = NOW.date()
FLUSH_KEYS = {"ok", "buckets", "rows", "units", "duration_s", "recovered_runs", "recovered_units",
              "oldest_unflushed_age_s", "unflushed_buckets", "retention_deleted_rows", "locked_pipelines", "errors",
              "pipelines", "interrupted", "dead_lettered_units", "dead_letter_units", "redis_maxmemory_policy",
              "unreplicated_units"}


async def test_flush_prints_one_json_line_and_exits_0(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                      config: Config, writer: LuaWriter) -> None:
    await writer.write([("view", "u1", NOW), ("view", "u2", NOW)])  # buckets d, h, u; rows 1 + 1 + 2
    code, out, err = await run_cli_async(["flush", "--batch-size", "2"], flush_env(config))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1  # stdout is the summary only; progress goes to stderr
    summary = json.loads(lines[0])
    assert set(summary) == FLUSH_KEYS
    assert summary["ok"] and summary["buckets"] == 3 and summary["rows"] == 4 and summary["units"] == 2
    assert summary["recovered_runs"] == 0 and summary["oldest_unflushed_age_s"] == 0.0
    assert summary["pipelines"][config.pipeline]["buckets"] == 3
    assert "buckets" in err  # the human progress/summary line
    assert await pg_counters(pg, config.pipeline) == writer.expected


async def test_flush_all_finds_every_pipeline(private_redis: RedisServer, pg: asyncpg.Connection,
                                              config: Config) -> None:
    """--all flushes every pipeline in ap:pipelines (on a private Redis: other tests' keys are not ours)."""
    other = config.pipeline + "-2"
    client = aioredis.Redis.from_url(private_redis.url, decode_responses=True)
    try:
        first = LuaWriter(client, make_config(config.pipeline, private_redis.url, config.database_url))
        second = LuaWriter(client, make_config(other, private_redis.url, config.database_url))
        await first.write([("view", "u1", NOW)])
        await second.write([("view", "u1", NOW), ("click", "u2", NOW)])
        env = flush_env(config, REDIS_URL=private_redis.url)
        code, out, err = await run_cli_async(["flush", "--all"], env)
        assert code == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert sorted(summary["pipelines"]) == sorted([config.pipeline, other])
        assert summary["rows"] == 3 + 6
        assert await pg_counters(pg, config.pipeline) == first.expected
        assert await pg_counters(pg, other) == second.expected
    finally:
        await client.aclose()
        await delete_pipeline_rows(pg, other)


@pytest.mark.parametrize("broken", ["postgres", "redis", "config", "pipeline"])
async def test_flush_failures_exit_2_with_one_line(broken: str, tmp_path: Path, redis_client: aioredis.Redis,
                                                   config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write([("view", "u1", NOW)])
    env = flush_env(config)
    args = ["flush"]
    if broken == "postgres":
        env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    elif broken == "redis":
        env["REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    elif broken == "config":
        (tmp_path / "bad.yaml").write_text("flush:\n  batch_size: 0\n")
        args += ["--config", str(tmp_path / "bad.yaml")]
    else:
        args += ["--pipeline", "Not A Pipeline"]
    code, out, err = await run_cli_async(args, env)
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]
    expected = {"postgres": "analytics-pipeline flush: error: PostgreSQL unreachable",
                "redis": "analytics-pipeline flush: error: Redis unreachable",
                "config": "analytics-pipeline: configuration error: ",
                "pipeline": "analytics-pipeline: configuration error: --pipeline"}[broken]
    assert last.startswith(expected), err
    if broken == "config":
        assert "flush.batch_size" in last
    assert "Traceback" not in err
    assert await redis_client.zcard(keys.dirty) == 3 and await redis_client.zcard(keys.inflight) == 0  # untouched


async def test_migrate_command_is_idempotent(config: Config, schema: str) -> None:
    code, out, err = await run_cli_async(["migrate"], flush_env(config))
    assert code == 0, err
    assert out.startswith("schema up to date")  # the session already migrated this database
    env = flush_env(config)
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    code, out, err = await run_cli_async(["migrate"], env)
    assert code == 2 and err.strip().splitlines()[-1].startswith("analytics-pipeline migrate: error: PostgreSQL")


async def test_query_command_table_and_json(redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config,
                                            writer: LuaWriter) -> None:
    await writer.write([("view", "u1", NOW), ("view", "u2", NOW), ("click", "u1", NOW)])
    env = flush_env(config)
    assert (await run_cli_async(["flush"], env))[0] == 0
    await writer.write([("view", "u3", NOW)])  # still in Redis
    day = TODAY.isoformat()
    code, out, err = await run_cli_async(["query", "counts", "--event", "view", "--from", day, "--to", day], env)
    assert code == 0, err
    assert out.split() == ["day", "count", day, "3", "-" * len(f"{day}  count"), "total", "3"]
    code, out, err = await run_cli_async(["query", "uniques", "--from", day, "--json"], env)
    assert code == 0, err
    assert json.loads(out) == {"event": None, "series": [{"bucket": day, "count": 3}], "distinct_total": 3,
                               "from": day, "to": day}
    code, out, err = await run_cli_async(["query", "events", "--json"], env)
    assert json.loads(out) == {"events": [{"event": "view", "count": 3}, {"event": "click", "count": 1}], "total": 4}
    code, out, err = await run_cli_async(["query", "counts", "--granularity", "hour", "--user-id", "u1"], env)
    assert code == 2 and err.strip() == ("analytics-pipeline query: error: --granularity: per-user counts are kept "
                                         "per day only: use 'day'")
    code, out, err = await run_cli_async(["query", "counts", "--from", "tomorrow"], env)
    assert code == 2 and err.strip().startswith("analytics-pipeline query: error: --from: not a date")


@pytest.fixture
async def fake_gateway() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A Pushgateway stand-in that records each request (method, path, body)."""
    seen: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append({"method": request.method, "path": request.path, "body": (await request.read()).decode()})
        return web.Response(status=200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app, port=free_port())
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", seen
    finally:
        await server.close()


async def test_pushgateway_receives_run_metrics(fake_gateway: tuple[str, list[dict[str, str]]],
                                                redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                config: Config, writer: LuaWriter) -> None:
    url, seen = fake_gateway
    await writer.write([("view", "u1", NOW)])
    code, _, err = await run_cli_async(["flush", "--pushgateway", url], flush_env(config))
    assert code == 0, err
    assert len(seen) == 1
    encoded = base64.urlsafe_b64encode(config.pipeline.encode()).decode()
    assert seen[0]["method"] == "POST"
    assert seen[0]["path"] == f"/metrics/job/analytics-pipeline-flush/pipeline@base64/{encoded}"
    body = seen[0]["body"]
    for line in ("analytics_flush_success 1.0", "analytics_flush_buckets 3.0", "analytics_flush_rows 3.0",
                 "analytics_flush_oldest_unflushed_age_seconds 0.0"):
        assert line in body, body
    assert "analytics_flush_last_success_timestamp_seconds" in body


async def test_pushgateway_down_does_not_fail_the_flush(config: Config, writer: LuaWriter,
                                                        pg: asyncpg.Connection) -> None:
    await writer.write([("view", "u1", NOW)])
    code, out, err = await run_cli_async(["flush", "--pushgateway", f"http://127.0.0.1:{free_port()}"],
                                         flush_env(config))
    assert code == 0 and json.loads(out)["rows"] == 3
    assert "pushgateway" in err


async def test_loop_runs_until_sigterm(config: Config, writer: LuaWriter, pg: asyncpg.Connection) -> None:
    import asyncio
    import signal
    import sys

    await writer.write([("view", "u1", NOW)])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analytics_pipeline", "flush", "--loop", "--interval", "0.2", env=flush_env(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    first = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    assert first["rows"] == 3
    await writer.write([("view", "u2", NOW)])
    second = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    while second["rows"] == 0:  # the write may land just after a run started
        second = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
    assert second["rows"] == 3
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    assert await pg_counters(pg, config.pipeline) == writer.expected
