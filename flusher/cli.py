"""Move Redis counters into PostgreSQL exactly once (the CronJob's command).

Each run first recovers units a dead flusher left in flight, then claims dirty buckets in batches and
writes each batch in one PostgreSQL transaction guarded by the flush ledger, then applies retention.
Progress goes to stderr; the last stdout line is one JSON object (buckets, rows, duration_s,
recovered_runs, oldest_unflushed_age_s, dead letters, per-pipeline details). Exit 0 on success, 2 when Redis
or PostgreSQL cannot be reached or the config is bad, 3 when the run worked but dead-lettered units wait
('analytics-pipeline deadletter list'), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import signal
import sys
import time
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
import redis.exceptions

from analytics_pipeline.core.config import Config, ConfigError, load_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.postgres import connect
from analytics_pipeline.core.redis_clients import RedisModeError, async_client, is_cluster_client
from analytics_pipeline.core.redis_requirements import PolicyCheck, check_nodes, check_policy, unchecked
from analytics_pipeline.core.shards import group_tags, registered_tags, valid_tag

from .errors import (
    POSTGRES_CONNECTION_ERRORS,
    REDIS_CONNECTION_ERRORS,
    FlushError,
    RedisMisconfigured,
    ServiceUnreachable,
    describe,
)
from .migrate import apply_schema
from .run import PipelineStats
from .shards import flush_pipeline_shards

log = logging.getLogger("analytics_pipeline.flusher")

REDIS_TIMEOUT_S = 10.0
# Exit code of a run that worked but leaves dead-lettered units waiting (docs/flush-protocol.md "Dead
# letters"): the Job fails, so the operator's lastFlush turns Failed and it posts a FlushFailed Warning.
DEAD_LETTER_EXIT = 3


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``analytics-pipeline flush``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--pipeline", metavar="NS/NAME", help="pipeline to flush (default: the config's pipeline)")
    which.add_argument("--all", action="store_true",
                       help="flush every pipeline that has written to this Redis (all shards of each)")
    parser.add_argument("--batch-size", type=_positive_int, metavar="N",
                        help="buckets per PostgreSQL transaction (default: flush.batch_size)")
    parser.add_argument("--shard-concurrency", type=_positive_int, metavar="N",
                        help="shards of a pipeline flushed at once (default: flush.shard_concurrency)")
    parser.add_argument("--no-lock", action="store_true",
                        help="do not take the per-pipeline Redis lock (tests; correctness never depends on it)")
    parser.add_argument("--migrate", action="store_true", help="apply the schema (idempotent) before flushing")
    parser.add_argument("--loop", action="store_true", help="run again every --interval seconds until SIGTERM")
    parser.add_argument("--interval", type=_positive_float, default=300.0, metavar="SECONDS",
                        help="seconds between runs with --loop (default: 300)")
    parser.add_argument("--pushgateway", metavar="URL", help="push run metrics to this Prometheus Pushgateway")


def summarize(stats: list[PipelineStats], duration_s: float) -> dict[str, Any]:
    """The final JSON object: totals over pipelines plus each pipeline's figures."""
    errors = {s.pipeline: s.error for s in stats if s.error}
    return {
        "ok": not errors,
        "buckets": sum(s.buckets for s in stats),
        "rows": sum(s.rows for s in stats),
        "units": sum(s.units for s in stats),
        "duration_s": round(duration_s, 3),
        "recovered_runs": sum(s.recovered_runs for s in stats),
        "recovered_units": sum(s.recovered_units for s in stats),
        "oldest_unflushed_age_s": max((s.oldest_unflushed_age_s for s in stats), default=0.0),
        "unflushed_buckets": sum(s.unflushed_buckets for s in stats),
        "retention_deleted_rows": sum(s.retention_deleted_rows for s in stats),
        "dead_lettered_units": sum(s.dead_lettered_units for s in stats),
        "dead_letter_units": sum(s.dead_letter_units for s in stats),
        # claims left in flight because too few replicas acknowledged them (docs/flush-protocol.md)
        "unreplicated_units": sum(len(s.unreplicated_units) for s in stats),
        "locked_pipelines": [s.pipeline for s in stats if s.locked],
        "errors": errors,
        "pipelines": {s.pipeline: s.as_dict() for s in stats},
    }


async def _pipelines(args: argparse.Namespace, config: Config, client: aioredis.Redis) -> list[str]:
    if not args.all:
        name = args.pipeline or config.pipeline
        try:
            PipelineKeys(name)
        except ValueError as error:
            raise ConfigError(f"--pipeline: {error}") from None
        return [name]
    tags = await registered_tags(client)
    for tag in sorted(tag for tag in tags if not valid_tag(tag)):
        log.warning("ignoring %r in %s: not a pipeline shard tag", tag, PIPELINES_SET)
    return list(group_tags(tags))  # a pipeline once, whatever number of shards it has


async def check_redis_policy(client: aioredis.Redis, config: Config) -> PolicyCheck:
    """Read ``maxmemory-policy`` (every run: a ``--loop`` flusher reconnects each time) on the Redis, or on
    every master of a cluster; RedisMisconfigured (naming the master) when one evicts and the config does
    not allow it, a warning when it cannot be read."""
    allowed = config.redis.allow_eviction
    try:
        if is_cluster_client(client):
            replies = await client.config_get("maxmemory-policy", target_nodes=client.PRIMARIES)  # type: ignore[call-arg,attr-defined]
            if not isinstance(replies, dict) or not all(isinstance(r, dict | list) for r in replies.values()):
                replies = {client.get_primaries()[0].name: replies}  # type: ignore[attr-defined]  # one master
            check = check_nodes(replies, allowed=allowed)
        else:
            check = check_policy(await client.config_get("maxmemory-policy"), allowed=allowed)
    except REDIS_CONNECTION_ERRORS:
        raise
    except redis.exceptions.ResponseError as error:  # NOPERM, unknown/renamed command (managed Redis)
        check = unchecked(describe(error), allowed=allowed)
    if check.problem:
        raise RedisMisconfigured(check.problem)
    if check.warning:
        log.warning("%s", check.warning)
    return check


async def run_once(args: argparse.Namespace, config: Config, stop: asyncio.Event) -> tuple[dict[str, Any], int]:
    """One run over the selected pipelines; returns the summary and the exit code."""
    started = time.monotonic()
    try:
        # a Redis Cluster (redis.cluster, auto: asked) gets redis-py's cluster client: MOVED/ASK, failover
        client = await async_client(config.redis_url, config.redis.cluster, timeout=REDIS_TIMEOUT_S)
    except RedisModeError as error:
        raise RedisMisconfigured(str(error)) from None
    except REDIS_CONNECTION_ERRORS as error:
        raise ServiceUnreachable(f"Redis unreachable: {describe(error)}") from error
    except redis.exceptions.RedisClusterException as error:  # no cluster node answered
        raise ServiceUnreachable(f"Redis Cluster unreachable: {describe(error)}") from error
    conn = None
    all_stats: list[PipelineStats] = []
    try:
        try:
            await client.ping()
            policy = await check_redis_policy(client, config)
            pipelines = await _pipelines(args, config, client)
        except REDIS_CONNECTION_ERRORS as error:
            raise ServiceUnreachable(f"Redis unreachable: {describe(error)}") from error
        except redis.exceptions.AskError as error:  # MOVED/ASK to a plain client: redis.cluster is 'off'
            raise RedisMisconfigured(f"Redis refused a command: {describe(error)}") from error
        except redis.exceptions.RedisError as error:
            raise FlushError(f"Redis refused a command: {describe(error)}") from error
        conn = await connect(config, "analytics-pipeline flush")
        if args.migrate:
            try:
                created = await apply_schema(conn)
            except POSTGRES_CONNECTION_ERRORS as error:
                raise ServiceUnreachable(f"PostgreSQL unreachable: {describe(error)}") from error
            except asyncpg.PostgresError as error:
                raise FlushError(f"migrate: PostgreSQL refused the schema: {describe(error)}") from error
            for kind, name in created:
                log.info("migrate: created %s %s", kind, name)
        for name in pipelines:
            if stop.is_set():
                break
            stats = await flush_pipeline_shards(
                client, conn, config, name, connect=functools.partial(connect, config, "analytics-pipeline flush"),
                concurrency=getattr(args, "shard_concurrency", None), batch_size=args.batch_size,
                use_lock=not args.no_lock, stop=stop)
            all_stats.append(stats)
            log.info("pipeline %s: %d buckets, %d rows in %.2fs; oldest unflushed %.1fs", name, stats.buckets,
                     stats.rows, stats.duration_s, stats.oldest_unflushed_age_s)
            if args.pushgateway:
                await _push(args.pushgateway, stats, policy)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)
        with contextlib.suppress(Exception):
            await client.aclose()
    summary = summarize(all_stats, time.monotonic() - started)
    summary["interrupted"] = stop.is_set()
    summary["redis_maxmemory_policy"] = policy.policy  # null: CONFIG GET refused (see the warning)
    code = max((s.exit_code for s in all_stats), default=0)
    if code == 0 and summary["dead_letter_units"]:
        code = DEAD_LETTER_EXIT  # flushed, but units wait in the dead letters: the CronJob's Job shows Failed
    return summary, code


async def _push(gateway: str, stats: PipelineStats, policy: PolicyCheck) -> None:
    from .metrics import push

    try:
        await push(gateway, stats, policy)
    except Exception as error:  # metrics are best effort: never fail a flush over them
        log.warning("pushgateway %s: %s", gateway, describe(error))


def _emit(summary: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace, config: Config) -> int:
    """Run once (or periodically with ``--loop``); SIGTERM/SIGINT finish the current batch and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    code = 0
    while True:
        try:
            summary, code = await run_once(args, config, stop)
        except FlushError as error:
            summary, code = {"ok": False, "error": str(error)}, error.exit_code
        except REDIS_CONNECTION_ERRORS as error:
            summary, code = {"ok": False, "error": f"Redis unreachable: {describe(error)}"}, 2
        except redis.exceptions.RedisError as error:
            summary, code = {"ok": False, "error": f"Redis refused a command: {describe(error)}"}, 1
        except POSTGRES_CONNECTION_ERRORS as error:
            summary, code = {"ok": False, "error": f"PostgreSQL unreachable: {describe(error)}"}, 2
        except asyncpg.PostgresError as error:
            summary, code = {"ok": False, "error": f"PostgreSQL: {describe(error)}"}, 1
        _emit(summary)
        if summary.get("errors") or summary.get("error"):
            reason = summary.get("error") or "; ".join(f"{p}: {e}" for p, e in summary["errors"].items())
            print(f"analytics-pipeline flush: error: {reason}", file=sys.stderr, flush=True)
        if summary.get("dead_letter_units"):
            print(f"analytics-pipeline flush: {summary['dead_letter_units']} dead-lettered unit(s) wait: see "
                  "'analytics-pipeline deadletter list', then 'retry' or 'discard' them", file=sys.stderr, flush=True)
        if not args.loop or stop.is_set():
            return code if not args.loop else 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.interval)
        if stop.is_set():
            return 0


def run(args: argparse.Namespace) -> int:
    """Entry point of ``analytics-pipeline flush``."""
    config = load_config(args.config)
    if args.batch_size is None:
        args.batch_size = config.flush.batch_size
    return asyncio.run(main_async(args, config))
