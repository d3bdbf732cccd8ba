"""The flush protocol in-process: exact totals, writes during a flush, batches, lock, retention, backlog."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import redis.asyncio as aioredis
from flushkit import (
    LuaWriter,
    assert_clean,
    assert_rollups_exact,
    delete_pipeline_rows,
    pg_counters,
    redis_leftovers,
)
from support import make_config

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.flusher.run import PipelineFlush, flush_pipeline
from analytics_pipeline.flusher.staging import Staging

NOW = datetime.now(UTC)


def events(n: int, *, types: int = 3, users: int = 5, hours: int = 3) -> list[tuple[str, str | None, datetime]]:
    return [(f"ev{i % types}", f"u{i % users}" if i % 7 else None, NOW - timedelta(hours=i % hours))
            for i in range(n)]


async def test_flush_moves_every_counter_exactly(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                 config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write(events(200))
    await writer.write(events(50, types=2, hours=30))  # several days of buckets
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline, batch_size=2)
    assert stats.error is None
    assert stats.units >= 3  # many buckets, batch size 2
    assert stats.rows == len(writer.expected)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))
    # a second run has nothing to do and changes nothing
    again = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert (again.units, again.buckets, again.rows) == (0, 0, 0)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)


async def test_writes_between_claim_and_cleanup_are_kept(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                        config: Config, writer: LuaWriter,
                                                        keys: PipelineKeys) -> None:
    """The seed lost increments that re-dirtied a bucket mid-flush; here they land in a fresh live bucket."""
    await writer.write(events(30))

    async def write_more(step: str) -> None:
        if step in ("after_claim", "in_transaction", "after_commit"):
            await writer.write(events(10))  # same buckets as those being flushed

    stats = await flush_pipeline(redis_client, pg, config, config.pipeline, hook=write_more)
    assert stats.error is None
    assert await redis_client.zcard(keys.dirty) > 0  # re-dirtied, waiting for the next run
    assert stats.unflushed_buckets > 0
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_run_is_bounded_under_continuous_writes(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                      config: Config, writer: LuaWriter) -> None:
    """A run claims what was dirty when it started, so writers re-dirtying buckets cannot keep it going."""
    await writer.write(events(20))
    claims = 0

    async def keep_writing(step: str) -> None:
        nonlocal claims
        if step == "after_claim":
            claims += 1
            await writer.write(events(20))

    stats = await flush_pipeline(redis_client, pg, config, config.pipeline, batch_size=1, hook=keep_writing)
    assert stats.error is None
    assert claims == stats.units <= 3 * 3 + 3 * 5 + 3  # at most the buckets dirty at the start
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)


async def test_recovery_of_a_claimed_unit_and_ledger_skip(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                          config: Config, writer: LuaWriter,
                                                          keys: PipelineKeys) -> None:
    """A unit left in flight is re-applied by the next run; if it had committed, the ledger skips it."""
    await writer.write(events(40))
    staging = Staging(redis_client, keys)
    claimed = await staging.claim("deadrun-00001", 1000)
    assert claimed.staged_keys and await staging.inflight_units() == ["deadrun-00001"]
    # a dead flusher committed a second unit but never cleaned it up
    await writer.write(events(5, types=1))
    flusher = PipelineFlush(redis_client, pg, config, config.pipeline)
    await staging.claim("deadrun2-00001", 1000)
    from analytics_pipeline.flusher.store import apply_unit

    committed = await apply_unit(pg, config.pipeline, "deadrun2-00001", await staging.read_unit("deadrun2-00001"))
    assert committed.applied
    stats = await flusher.run()
    assert stats.error is None
    assert (stats.recovered_units, stats.recovered_runs, stats.skipped_units) == (2, 2, 1)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_lock_held_by_another_flusher_skips(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                  config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write(events(10))
    await redis_client.set(keys.lock, "someone-else", px=60_000)
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.locked and stats.units == 0 and stats.unflushed_buckets > 0
    assert await redis_client.get(keys.lock) == "someone-else"  # not ours to release
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline, use_lock=False)
    assert stats.units == 1 and await redis_client.get(keys.lock) == "someone-else"
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)


async def test_lock_released_after_run(redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config,
                                       writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write(events(3))
    seen: list[str | None] = []

    async def look(step: str) -> None:
        if step == "after_claim":
            seen.append(await redis_client.get(keys.lock))

    stats = await flush_pipeline(redis_client, pg, config, config.pipeline, hook=look)
    assert seen and seen[0] is not None and not stats.lock_lost
    assert await redis_client.exists(keys.lock) == 0


async def test_backlog_age_reports_the_oldest_unflushed_bucket(redis_client: aioredis.Redis,
                                                               pg: asyncpg.Connection, config: Config,
                                                               writer: LuaWriter, keys: PipelineKeys) -> None:
    await writer.write(events(3))
    old_key = keys.daily(NOW - timedelta(days=1))
    # Dirty for an hour by Redis's clock (the one the flusher measures with), not by the module's NOW: the
    # age must not depend on how long the suite ran before this test; the slack is what this test took.
    since = time.monotonic()
    seconds, micros = await redis_client.time()
    await redis_client.zadd(keys.dirty, {old_key: seconds * 1000 + micros // 1000 - 3_600_000})
    await redis_client.set(keys.lock, "other", px=60_000)
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.locked
    assert 3600 <= stats.oldest_unflushed_age_s <= 3600 + (time.monotonic() - since) + 0.01
    await redis_client.delete(keys.lock)
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.oldest_unflushed_age_s == 0.0 and stats.unflushed_buckets == 0


async def test_retention_deletes_only_old_rows_of_the_named_pipeline(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter,
        pipeline: str) -> None:
    other = pipeline + "-other"
    old = NOW - timedelta(days=40)
    recent = NOW - timedelta(days=5)
    short = make_config(pipeline, config.redis_url, config.database_url, flush={"retention_days": 30},
                        counters={"ttl_seconds": 90 * 86400})
    other_config = make_config(other, config.redis_url, config.database_url, flush={"retention_days": 30},
                               counters={"ttl_seconds": 90 * 86400})
    other_writer = LuaWriter(redis_client, other_config)
    try:
        await other_writer.write([("a", "u1", old), ("a", "u1", recent)])
        other_stats = await flush_pipeline(redis_client, pg, make_config(
            other, config.redis_url, config.database_url, flush={"retention_days": 400}), other)
        assert other_stats.error is None and other_stats.retention_deleted_rows == 0
        await pg.execute("UPDATE analytics_flush_ledger SET applied_at = now() - interval '31 days' "
                         "WHERE pipeline = ANY($1)", [other])
        await writer.write([("a", "u1", old), ("a", "u1", recent), ("b", None, old)])
        stats = await flush_pipeline(redis_client, pg, short, pipeline)
        assert stats.error is None
        assert stats.retention_deleted_rows == 5  # the old day: 2 daily, 2 hourly, 1 per-user row
        mine = await pg_counters(pg, pipeline)
        assert mine == {key: n for key, n in writer.expected.items() if key[2] != old.date()
                        and key[2] != old.replace(minute=0, second=0, microsecond=0)}
        assert await pg_counters(pg, other) == other_writer.expected  # untouched
        assert await pg.fetchval("SELECT count(*) FROM analytics_flush_ledger WHERE pipeline = $1", other) == 1
        # ledger retention of the other pipeline happens in its own run only
        await flush_pipeline(redis_client, pg, other_config, other)
        assert await pg.fetchval("SELECT count(*) FROM analytics_flush_ledger WHERE pipeline = $1", other) == 0
    finally:

        await delete_pipeline_rows(pg, other)
        await redis_client.delete(*[k async for k in redis_client.scan_iter(match=PipelineKeys(other).scan_pattern)])
        await redis_client.srem("ap:pipelines", other)


async def test_missing_schema_is_reported(redis_client: aioredis.Redis, config: Config, writer: LuaWriter,
                                          schema: str) -> None:
    await writer.write(events(2))
    conn = await asyncpg.connect(schema)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS ap_empty_schema_test")
        await conn.execute("SET search_path TO ap_empty_schema_test")
        stats = await flush_pipeline(redis_client, conn, config, config.pipeline)
    finally:
        await conn.close()
    assert stats.exit_code == 2 and stats.error and "analytics-pipeline migrate" in stats.error
    assert await redis_client.zcard(PipelineKeys(config.pipeline).inflight) == 1  # kept for the next run


async def test_lock_is_owned_by_its_token(redis_client: aioredis.Redis, keys: PipelineKeys) -> None:
    staging = Staging(redis_client, keys)
    token = await staging.acquire_lock(60_000)
    assert token and await staging.acquire_lock(60_000) is None
    assert not await staging.extend_lock("not-mine", 60_000)
    assert not await staging.release_lock("not-mine") and await redis_client.get(keys.lock) == token
    assert await staging.release_lock(token) and await redis_client.exists(keys.lock) == 0


async def test_lock_is_extended_while_a_run_lasts(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                  config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    short = make_config(config.pipeline, config.redis_url, config.database_url, flush={"lock_ttl_seconds": 5})
    await writer.write(events(3))
    extended: list[int] = []

    async def slow(step: str) -> None:
        """Hold the run until the lock's remaining time goes up (an extension), however late the keeper runs
        on a loaded machine; a fixed sleep would race it. 30 s bounds a hang, asserts no speed."""
        if step == "after_claim":
            previous = await redis_client.pttl(keys.lock)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                now = await redis_client.pttl(keys.lock)
                if now > previous:
                    extended.append(now)
                    return
                previous = now

    stats = await flush_pipeline(redis_client, pg, short, config.pipeline, hook=slow)
    assert stats.error is None and not stats.lock_lost
    assert extended, "the lock was never extended while the run lasted"


async def test_a_unit_is_read_in_chunks_of_bounded_size(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                        config: Config, writer: LuaWriter, keys: PipelineKeys,
                                                        monkeypatch) -> None:
    """The flusher never holds a whole unit: it reads it a few buckets (at most N counters, or one
    bigger bucket) at a time inside the unit's transaction, and the totals and rollups stay exact."""
    from analytics_pipeline.flusher import staging as staging_module

    await writer.write(events(400, types=4, users=9, hours=30))  # daily, hourly, per-user over 2 days
    await writer.write([(f"ev{i % 5}", f"w{i}", NOW) for i in range(50)])  # today's per-user bucket: > 50 fields
    reads: list[int] = []
    original = Staging.read_buckets

    async def counting(self: Staging, unit_id: str, staged_keys: list[str]) -> list:
        buckets = await original(self, unit_id, staged_keys)
        reads.append(sum(len(bucket.counts) for bucket in buckets))
        return buckets

    monkeypatch.setattr(staging_module, "READ_CHUNK_FIELDS", 30)
    monkeypatch.setattr(Staging, "read_buckets", counting)
    sizes = {key: await redis_client.hlen(key) for key in await redis_client.zrange(keys.dirty, 0, -1)}
    assert max(sizes.values()) > 30  # at least one bucket is read alone
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)  # one unit: default batch size
    assert stats.error is None and stats.units == 1 and stats.rows == len(writer.expected)
    assert sum(reads) == sum(sizes.values()) and len(reads) > 3
    assert all(read <= 30 or read in sizes.values() for read in reads)  # over 30 only as a single bucket
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    ledger = await pg.fetchrow("SELECT buckets, rows FROM analytics_flush_ledger WHERE pipeline = $1", config.pipeline)
    assert (ledger["buckets"], ledger["rows"]) == (len(sizes), len(writer.expected))


async def test_a_bucket_bigger_than_a_chunk_is_scanned_and_repeated_fields_count_once(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter, keys: PipelineKeys,
        monkeypatch) -> None:
    """A bucket over the chunk size is read in HSCAN pieces; HSCAN may return a field twice, so here
    every piece is delivered twice: the totals, the rollups and the ledger must not see it."""
    from analytics_pipeline.flusher import staging as staging_module

    await writer.write([(f"ev{i % 3}", f"user{i % 250}", NOW) for i in range(750)])  # 750 per-user fields
    pieces: list[int] = []
    original = Staging.scan_bucket

    async def twice(self: Staging, unit_id: str, staged_key: str, count: int):  # type: ignore[no-untyped-def]
        async for piece in original(self, unit_id, staged_key, count):
            pieces.append(len(piece.counts))
            yield piece
            yield piece

    monkeypatch.setattr(staging_module, "READ_CHUNK_FIELDS", 100)
    monkeypatch.setattr(staging_module, "SCAN_BUCKET_FIELDS", 500)
    monkeypatch.setattr(Staging, "scan_bucket", twice)
    stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert stats.error is None and stats.rows == len(writer.expected) == 3 + 3 + 750
    assert len(pieces) >= 3 and sum(pieces) >= 750 and max(pieces) < 750  # really read in pieces
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert await pg.fetchval("SELECT rows FROM analytics_flush_ledger WHERE pipeline = $1", config.pipeline) == 756
    assert_clean(await redis_leftovers(redis_client, keys))


async def test_a_scanned_unit_that_failed_mid_transaction_is_recovered_exactly(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter, keys: PipelineKeys,
        monkeypatch) -> None:
    """The unit's transaction dies after every piece was COPYed (and some twice): nothing of it stays in
    PostgreSQL, the unit stays in flight, and the next run reads the unchanged staging keys again."""
    from analytics_pipeline.flusher import staging as staging_module

    await writer.write([(f"ev{i % 3}", f"user{i % 250}", NOW) for i in range(750)])
    monkeypatch.setattr(staging_module, "READ_CHUNK_FIELDS", 100)
    monkeypatch.setattr(staging_module, "SCAN_BUCKET_FIELDS", 500)

    async def die_in_transaction(step: str) -> None:
        if step == "in_transaction":
            raise ConnectionResetError("simulated: the connection died before COMMIT")

    failed = await flush_pipeline(redis_client, pg, config, config.pipeline, hook=die_in_transaction)
    assert failed.error is not None and failed.rows == 0
    assert await redis_client.zcard(keys.inflight) == 1
    assert await pg_counters(pg, config.pipeline) == {}
    recovered = await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert recovered.error is None and recovered.recovered_units == 1 and recovered.rows == 756
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    assert_clean(await redis_leftovers(redis_client, keys))
