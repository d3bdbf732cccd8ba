"""One flush run for a whole pipeline: every shard flushed (bounded concurrency), then the per-pipeline steps.

A pipeline's shards are ``core.shards.pipeline_shards``: the configured N plus every tag a writer
registered (old shards after N changed are drained here until empty). Each shard runs the whole
protocol of flusher/run.py on its own keys: its own lock, claims, in-flight units, recovery and
ledger units (each shard run has its own run id, so unit ids never collide across shards). At most
``flush.shard_concurrency`` shards run at once, each over its own PostgreSQL connection: their Redis
work (claims, staged reads outside a transaction, cleanup) overlaps, while their PostgreSQL applies
take turns under the pipeline's advisory lock (flusher/store.py), which the uniques rollups need
anyway and which rules out deadlocks between shards upserting the same rows. Retention and the
dead-letter count run once per pipeline, in shard 0's run (under its lock, as with one shard), keeping
the ledger rows of every shard's in-flight units.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.shards import pipeline_shards

from . import deadletter
from .errors import POSTGRES_CONNECTION_ERRORS, REDIS_CONNECTION_ERRORS, FlushError, describe
from .run import Hook, PipelineFlush, PipelineStats

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]

# Figures that add up over shards (the rest: max, or taken from the pipeline-wide steps).
_SUMMED = ("units", "buckets", "rows", "skipped_units", "recovered_units", "recovered_runs", "unflushed_buckets",
           "inflight_units", "dead_lettered_units", "retention_deleted_rows", "dead_letter_units")


def combine(pipeline: str, shards: list[PipelineStats]) -> PipelineStats:
    """The pipeline's totals over its shards' stats (each kept under ``shards``)."""
    total = PipelineStats(pipeline)
    for name in _SUMMED:
        setattr(total, name, sum(getattr(s, name) for s in shards))
    total.run_id = ",".join(s.run_id for s in shards if s.run_id)
    total.oldest_unflushed_age_s = max((s.oldest_unflushed_age_s for s in shards), default=0.0)
    total.locked = any(s.locked for s in shards)
    total.lock_lost = any(s.lock_lost for s in shards)
    total.lock_skipped = next((s.lock_skipped for s in shards if s.lock_skipped), None)
    total.interrupted = any(s.interrupted for s in shards)
    errors = [f"{s.shard}: {s.error}" if len(shards) > 1 else s.error for s in shards if s.error]
    total.error = "; ".join(e for e in errors if e) or None
    total.exit_code = max((s.exit_code for s in shards), default=0)
    total.replicas_required = max((s.replicas_required for s in shards), default=0)
    total.unreplicated_units = [unit for s in shards for unit in s.unreplicated_units]
    total.shards = {s.shard or pipeline: s for s in shards}
    return total


async def _shards_of(client: aioredis.Redis, pipeline: str, configured: int) -> list[PipelineKeys] | PipelineStats:
    """The pipeline's shards, or its failed stats when Redis cannot say (same exit codes as a shard's run)."""
    try:
        return await pipeline_shards(client, pipeline, configured)
    except (*REDIS_CONNECTION_ERRORS, redis.exceptions.RedisError) as error:
        failed = PipelineStats(pipeline)
        if isinstance(error, REDIS_CONNECTION_ERRORS):
            failed.exit_code, failed.error = 2, f"Redis unreachable: {describe(error)}"
        else:  # MOVED/ASK to a plain client (redis.cluster is 'off') is a misconfiguration: exit 2 as well
            failed.exit_code = 2 if isinstance(error, redis.exceptions.AskError) else 1
            failed.error = f"Redis refused a command: {describe(error)}"
        log.error("pipeline %s: flush failed: %s", pipeline, failed.error)
        return failed


async def flush_pipeline_shards(client: aioredis.Redis, conn: asyncpg.Connection, config: Config, pipeline: str, *,
                                connect: Connect | None = None, concurrency: int | None = None,
                                batch_size: int | None = None, use_lock: bool = True,
                                stop: asyncio.Event | None = None, hook: Hook | None = None) -> PipelineStats:
    """Flush every shard of ``pipeline`` (up to ``concurrency`` at once, default ``flush.shard_concurrency``),
    then its retention and dead-letter count; returns the totals with per-shard stats.

    ``conn`` serves the first worker and the per-pipeline steps; ``connect`` opens one more connection per
    extra worker (closed at the end). Without it the shards run one after the other on ``conn``.
    """
    started = time.monotonic()
    stop = stop or asyncio.Event()
    configured = config.counters.shards if pipeline == config.pipeline else 1
    shards = await _shards_of(client, pipeline, configured)
    if isinstance(shards, PipelineStats):
        return shards
    workers = min(concurrency or config.flush.shard_concurrency, len(shards)) if connect is not None else 1
    connections: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
    connections.put_nowait(conn)
    opened: list[asyncpg.Connection] = []
    results: list[PipelineStats] = []
    try:
        for _ in range(workers - 1):
            assert connect is not None
            try:
                extra = await connect()
            except FlushError as error:  # fewer workers, not a failed run
                log.warning("pipeline %s: flushing shards with %d connection(s): %s", pipeline, len(opened) + 1, error)
                break
            opened.append(extra)
            connections.put_nowait(extra)

        async def inflight() -> list[str]:
            """The in-flight units of every shard (retention keeps their ledger rows)."""
            units = await asyncio.gather(*(client.zrange(keys.inflight, 0, -1) for keys in shards))
            return [u.decode() if isinstance(u, bytes) else u for shard_units in units for u in shard_units]

        async def one(keys_tag: str) -> PipelineStats:
            shard_conn = await connections.get()
            first = keys_tag == pipeline  # shard 0 runs the per-pipeline steps (retention, dead letters)
            try:
                return await PipelineFlush(client, shard_conn, config, pipeline, batch_size=batch_size,
                                           use_lock=use_lock, stop=stop, hook=hook, tag=keys_tag,
                                           pipeline_steps=first, keep_units=inflight if first else None).run()
            finally:
                connections.put_nowait(shard_conn)

        results = list(await asyncio.gather(*(one(keys.tag) for keys in shards)))
    finally:
        for extra in opened:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(extra.close(), 5)
    total = combine(pipeline, results)
    if len(shards) > 1 and total.error is None:  # units other shards set aside after shard 0 counted
        with contextlib.suppress(*POSTGRES_CONNECTION_ERRORS):
            total.dead_letter_units = await deadletter.count(conn, pipeline)
    total.duration_s = round(time.monotonic() - started, 3)
    return total
