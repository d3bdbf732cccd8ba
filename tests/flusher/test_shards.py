"""Sharded pipelines (``counters.shards``): flushed concurrently, read in one snapshot, N changed live.

Every test takes the Redis URL from the ``redis_url`` fixture (and writers are the sidecar's real
``GroupCommitter`` on a shard tag), so the same tests can be pointed at a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import yaml
from flushkit import CounterKey, assert_clean, assert_rollups_exact, increments, pg_counters, redis_leftovers
from support import flush_env, make_config

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, key_slot, shard_tags, sidecar_shard_tag
from analytics_pipeline.core.postgres import connect
from analytics_pipeline.core.redis_clients import async_client
from analytics_pipeline.core.services import RedisClusterServers
from analytics_pipeline.core.shards import pipeline_shards
from analytics_pipeline.flusher.run import Hook, PipelineStats
from analytics_pipeline.flusher.shards import flush_pipeline_shards
from analytics_pipeline.reads.queries import Queries
from analytics_pipeline.sidecar.committer import GroupCommitter

NOW = datetime.now(UTC)
DAYS = [NOW.date() - timedelta(days=1), NOW.date()]


def sharded(config: Config, shards: int) -> Config:
    """``config`` with ``counters.shards = shards``."""
    return make_config(config.pipeline, config.redis_url, config.database_url, counters={"shards": shards})


def random_events(rng: random.Random, n: int) -> list[Event]:
    """Events over the last 30 hours (two days, several hours), 20 users, some anonymous."""
    return [Event(f"ev{rng.randrange(4)}", f"u{rng.randrange(20)}" if rng.random() < 0.8 else None,
                  NOW - timedelta(hours=rng.randrange(30), minutes=rng.randrange(60)), None) for _ in range(n)]


class ShardWriters:
    """One real GroupCommitter per shard tag; remembers what was acked (``expected``) and sent (``sent``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.committers: dict[str, GroupCommitter] = {}
        self.expected: Counter[CounterKey] = Counter()
        self.sent: Counter[CounterKey] = Counter()

    def committer(self, tag: str) -> GroupCommitter:
        if tag not in self.committers:
            self.committers[tag] = GroupCommitter(self.config, tag=tag)
        return self.committers[tag]

    async def write(self, tag: str, events: Sequence[Event]) -> None:
        counted = increments(self.config, [(e.event_type, e.user_id, e.timestamp) for e in events])
        self.sent.update(counted)
        assert await self.committer(tag).commit(events) == 0
        self.expected.update(counted)  # acked: the committer's write is in Redis

    async def close(self) -> None:
        for committer in self.committers.values():
            await committer.close()


@pytest.fixture
async def shard_cleanup(redis_client: aioredis.Redis, pipeline: str) -> AsyncIterator[None]:
    """Remove every shard's keys of the test pipeline (the redis_client fixture removes shard 0's)."""
    yield
    tags = {t for n in (2, 3, 4) for t in shard_tags(pipeline, n)}
    for tag in tags:
        keys = PipelineKeys(pipeline, tag)
        batch = [key async for key in redis_client.scan_iter(match=keys.scan_pattern, count=1000)]
        if batch:
            await redis_client.delete(*batch)
    await redis_client.srem(PIPELINES_SET, *tags, pipeline)


async def flush_all_shards(client: aioredis.Redis, conn: asyncpg.Connection, config: Config, *,
                           concurrency: int = 3, batch_size: int | None = None, hook: Hook | None = None,
                           use_lock: bool = True) -> PipelineStats:
    stats = await flush_pipeline_shards(client, conn, config, config.pipeline, connect=lambda: connect(config),
                                        concurrency=concurrency, batch_size=batch_size, hook=hook,
                                        use_lock=use_lock)
    assert stats.error is None, stats.error
    return stats


async def assert_all_shards_clean(client: aioredis.Redis, config: Config) -> None:
    for keys in await pipeline_shards(client, config.pipeline, config.counters.shards):
        assert_clean(await redis_leftovers(client, keys))


def expected_view(expected: Counter[CounterKey]) -> dict[str, Any]:
    """What the queries must answer for ``expected`` (daily/hourly per event type, per user, uniques)."""
    daily: Counter[tuple[str, date]] = Counter()
    hourly: Counter[tuple[str, datetime]] = Counter()
    users: Counter[tuple[str, date]] = Counter()
    uniques: dict[date, set[str]] = {}
    for key, count in expected.items():
        if key[0] == "d":
            daily[key[1], key[2]] += count
        elif key[0] == "h":
            hourly[key[1], key[2]] += count
        else:
            users[key[3], key[2]] += count
            uniques.setdefault(key[2], set()).add(key[3])
    return {"daily": daily, "hourly": hourly, "users": users, "uniques": uniques}


async def check_queries(q: Queries, expected: Counter[CounterKey]) -> None:
    """Every figure of ``q`` equals ``expected``: per event type per day and hour, per user, daily uniques."""
    view = expected_view(expected)
    for event in ("ev0", "ev1", "ev2", "ev3"):
        series = await q.counts(event, DAYS[0], DAYS[-1], "day")
        assert [p.count for p in series.points] == [view["daily"][event, d] for d in DAYS], event
        first = datetime(DAYS[0].year, DAYS[0].month, DAYS[0].day, tzinfo=UTC)
        hours = await q.counts(event, first, NOW, "hour")
        assert [p.count for p in hours.points] == [view["hourly"][event, p.bucket] for p in hours.points], event
    for user in ("u0", "u7", "u19"):
        series = await q.counts(None, DAYS[0], DAYS[-1], "day", user_id=user)
        assert [p.count for p in series.points] == [view["users"][user, d] for d in DAYS], user
    uniques = await q.uniques(None, DAYS[0], DAYS[-1])
    assert [p.count for p in uniques.points] == [len(view["uniques"].get(d, ())) for d in DAYS]
    assert uniques.distinct_total == len(set().union(*view["uniques"].values()))
    snapshot = await q.dashboard_snapshot(now=NOW, hours=30, days=2)
    assert snapshot.totals == {e: sum(c for (ev, d), c in view["daily"].items() if ev == e and d in DAYS)
                               for e in sorted({ev for ev, _ in view["daily"]})}


async def test_three_shards_flushed_concurrently_are_exact(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                           config: Config, shard_cleanup: None) -> None:
    cfg = sharded(config, 3)
    tags = shard_tags(cfg.pipeline, 3)
    writers = ShardWriters(cfg)
    rng = random.Random(3)
    try:
        for round_ in range(30):
            await writers.write(tags[round_ % 3], random_events(rng, rng.randrange(1, 40)))
    finally:
        await writers.close()
    assert len({PipelineKeys(cfg.pipeline, t).slot for t in tags}) == 3  # three hash tags, three slots
    q = Queries.for_config(redis_client, pg, cfg)
    await check_queries(q, writers.expected)  # all in Redis, three shards

    started = asyncio.Barrier(3)

    async def all_three_at_once(step: str) -> None:  # every shard's run holds its lock at the same time
        if step == "after_lock":
            await asyncio.wait_for(started.wait(), 60)

    stats = await flush_all_shards(redis_client, pg, cfg, concurrency=3, batch_size=2, hook=all_three_at_once)
    assert sorted(stats.shards) == sorted(tags)
    assert all(s.units > 0 and s.error is None for s in stats.shards.values())
    assert stats.units == sum(s.units for s in stats.shards.values())
    assert stats.rows == sum(s.rows for s in stats.shards.values())
    run_ids = [s.run_id for s in stats.shards.values()]
    assert len(set(run_ids)) == 3  # unit ids (run id + batch) never collide across shards
    ledger = await pg.fetch("SELECT unit_id FROM analytics_flush_ledger WHERE pipeline = $1", cfg.pipeline)
    assert len(ledger) == stats.units
    assert await pg_counters(pg, cfg.pipeline) == writers.expected
    await assert_rollups_exact(pg, cfg.pipeline)
    await assert_all_shards_clean(redis_client, cfg)
    await check_queries(q, writers.expected)  # all in PostgreSQL
    summary = stats.as_dict()
    assert set(summary["shards"]) == set(tags) and summary["rows"] == stats.rows  # type: ignore[arg-type]


async def test_flush_all_groups_shard_tags_by_pipeline(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                       config: Config, shard_cleanup: None, tmp_path: Path) -> None:
    """``flush --all`` (and ``flush``) flush every registered shard once, reported per shard and in total."""
    cfg = sharded(config, 3)
    writers = ShardWriters(cfg)
    rng = random.Random(5)
    try:
        for round_, tag in enumerate(shard_tags(cfg.pipeline, 3) * 3):
            await writers.write(tag, random_events(rng, 10 + round_))
    finally:
        await writers.close()
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"counters": {"shards": 3}, "flush": {"shard_concurrency": 2}}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analytics_pipeline", "flush", "--all", "--batch-size", "3",
        env=flush_env(cfg, ANALYTICS_CONFIG=str(config_file)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().splitlines()[-1])
    mine = summary["pipelines"][cfg.pipeline]
    assert sorted(mine["shards"]) == sorted(shard_tags(cfg.pipeline, 3))
    assert not any("#" in name for name in summary["pipelines"])  # pipelines, not shard tags
    assert mine["rows"] == sum(s["rows"] for s in mine["shards"].values())
    assert await pg_counters(pg, cfg.pipeline) == writers.expected
    await assert_rollups_exact(pg, cfg.pipeline)
    await assert_all_shards_clean(redis_client, cfg)


async def test_multi_shard_query_races_are_retried_or_need_none(redis_client: aioredis.Redis,
                                                                pg: asyncpg.Connection, config: Config,
                                                                shard_cleanup: None) -> None:
    """The seqlock over every shard: a claim on ANY shard between the Redis and the PostgreSQL read
    makes the query retry; a commit + cleanup needs none. Exact either way."""
    cfg = sharded(config, 3)
    tags = shard_tags(cfg.pipeline, 3)
    writers = ShardWriters(cfg)
    rng = random.Random(11)
    try:
        for tag in tags:
            await writers.write(tag, random_events(rng, 30))
    finally:
        await writers.close()
    view = expected_view(writers.expected)
    total = sum(view["daily"].values())

    async def flush_last_shard(attempt: int) -> None:  # claim + commit + cleanup of shard 2 only
        if attempt == 0:
            from analytics_pipeline.flusher.run import PipelineFlush
            stats = await PipelineFlush(redis_client, pg, cfg, cfg.pipeline, tag=tags[2], pipeline_steps=False).run()
            assert stats.units == 1 and stats.error is None

    q = Queries.for_config(redis_client, pg, cfg, after_snapshot=flush_last_shard)
    series = await q.counts(None, DAYS[0], DAYS[-1], "day")
    assert series.total == total and q.retries == 1  # not counted twice

    from analytics_pipeline.flusher.staging import Staging
    from analytics_pipeline.flusher.store import apply_unit
    staging = Staging(redis_client, PipelineKeys(cfg.pipeline, tags[1]))
    await staging.claim("shardrun-00001", 1000)

    async def commit_in_between(attempt: int) -> None:  # shard 1's unit was staged when Redis was read
        if attempt == 0:
            assert (await apply_unit(pg, cfg.pipeline, "shardrun-00001",
                                     await staging.read_unit("shardrun-00001"))).applied
            await staging.cleanup("shardrun-00001")

    q = Queries.for_config(redis_client, pg, cfg, after_snapshot=commit_in_between)
    series = await q.counts(None, DAYS[0], DAYS[-1], "day")
    assert series.total == total and q.retries == 0  # not lost
    await flush_all_shards(redis_client, pg, cfg)
    await check_queries(Queries.for_config(redis_client, pg, cfg), writers.expected)


def _daily_total(counter: Counter[CounterKey]) -> int:
    return sum(count for key, count in counter.items() if key[0] == "d")


async def run_writers(writers: ShardWriters, tags: Callable[[int], str], stop: asyncio.Event, clients: int,
                      seed: int) -> int:
    """``clients`` writers posting small batches until ``stop``; client i writes to ``tags(i)``."""
    async def client(i: int) -> int:
        rng = random.Random(seed * 100 + i)
        posted = 0
        while not stop.is_set():
            await writers.write(tags(i), random_events(rng, rng.randrange(1, 8)))
            posted += 1
            await asyncio.sleep(rng.random() * 0.005)
        return posted

    return sum(await asyncio.gather(*(client(i) for i in range(clients))))


async def test_multi_shard_query_exact_while_flushes_run(redis_url: str, redis_client: aioredis.Redis,
                                                         pg: asyncpg.Connection, config: Config,
                                                         shard_cleanup: None) -> None:
    """Writers on 3 shards and a flusher of all shards (concurrently, batch size 1) run while queries read:
    every answer lies between what was acked before it and what was sent after it; exact at the end."""
    cfg = sharded(config, 3)
    tags = shard_tags(cfg.pipeline, 3)
    writers = ShardWriters(cfg)
    stop = asyncio.Event()
    flushed: list[PipelineStats] = []

    async def flusher() -> None:
        client = aioredis.Redis.from_url(redis_url)
        conn = await connect(cfg)
        try:
            while not stop.is_set():
                flushed.append(await flush_all_shards(client, conn, cfg, batch_size=1))
        finally:
            await client.aclose()
            await conn.close()

    async def reader() -> int:
        q = Queries.for_config(redis_client, pg, cfg)
        checked = 0
        while checked < 40 or sum(s.units for s in flushed) < 10:
            before = _daily_total(writers.expected)
            total = (await q.counts(None, DAYS[0], DAYS[-1], "day")).total
            after = _daily_total(writers.sent)
            assert before <= total <= after, (before, total, after)
            checked += 1
        stop.set()
        return checked

    flushing = asyncio.create_task(flusher())
    try:
        results = await asyncio.wait_for(asyncio.gather(
            run_writers(writers, lambda i: tags[i % 3], stop, 6, seed=1), reader()), 240)
    finally:
        stop.set()
        await flushing
        await writers.close()
    assert results[0] > 0 and results[1] >= 40
    assert sum(s.units for s in flushed) >= 10  # the flushes really ran under the queries
    await flush_all_shards(redis_client, pg, cfg)
    assert await pg_counters(pg, cfg.pipeline) == writers.expected
    await assert_rollups_exact(pg, cfg.pipeline)
    await assert_all_shards_clean(redis_client, cfg)
    await check_queries(Queries.for_config(redis_client, pg, cfg), writers.expected)


async def _flush_process(env: dict[str, str], args: Sequence[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "analytics_pipeline", "flush", *args, env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.parametrize("shards", [1, 3])
async def test_chaos_sixteen_clients_flushers_sigkilled_at_random(shards: int, redis_client: aioredis.Redis,
                                                                  pg: asyncpg.Connection, config: Config,
                                                                  shard_cleanup: None, tmp_path: Path) -> None:
    """16 clients post (spread over the shards' tags), flusher processes are SIGKILLed at random moments
    (one after another, and two at once); after a final clean flush PostgreSQL's daily, hourly and per-user
    totals equal exactly what was acked."""
    cfg = sharded(config, shards)
    tags = shard_tags(cfg.pipeline, shards)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"counters": {"shards": shards}}))
    env = flush_env(cfg, ANALYTICS_CONFIG=str(config_file))
    writers = ShardWriters(cfg)
    stop = asyncio.Event()
    rng = random.Random(shards)
    outcomes: Counter[str] = Counter()

    async def chaos() -> None:
        for round_ in range(24):
            args = ["--batch-size", str(rng.choice([1, 2, 5]))] + (["--no-lock"] if round_ % 3 == 0 else [])
            processes = [await _flush_process(env, args) for _ in range(1 + round_ % 2)]
            await asyncio.sleep(rng.uniform(0.05, 0.8))
            for process in processes:
                if process.returncode is None and rng.random() < 0.8:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGKILL)
                await process.wait()
                outcomes["killed" if process.returncode == -signal.SIGKILL else f"exit {process.returncode}"] += 1
        stop.set()

    try:
        posted, _ = await asyncio.wait_for(asyncio.gather(
            run_writers(writers, lambda i: tags[i % shards], stop, 16, seed=shards), chaos()), 280)
    finally:
        stop.set()
        await writers.close()
    assert posted > 100 and outcomes["killed"] >= 5, outcomes
    assert set(outcomes) <= {"killed", "exit 0"}, outcomes
    # the last run: --no-lock (a killed run's lock lives on until its TTL), then exact
    process = await _flush_process(env, ["--no-lock"])
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-2000:]
    assert await pg_counters(pg, cfg.pipeline) == writers.expected
    await assert_rollups_exact(pg, cfg.pipeline)
    await assert_all_shards_clean(redis_client, cfg)
    if shards > 1:  # the keys really spread: one hash slot per shard
        assert len({key_slot(PipelineKeys(cfg.pipeline, t).dirty) for t in tags}) == shards


@pytest.fixture(params=["single", "cluster"])
async def any_redis(request: pytest.FixtureRequest, redis_url: str, redis_client: aioredis.Redis,
                    tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """(URL, client): the suite's single Redis, or a fresh 3-master/3-replica Redis Cluster."""
    if request.param == "single":
        yield redis_url, redis_client
        return
    cluster = RedisClusterServers(tmp_path / "cluster").start()
    client = await async_client(cluster.url, "on", decode_responses=True)
    try:
        yield cluster.url, client
    finally:
        await client.aclose()
        cluster.stop()


@pytest.mark.slow
async def test_shards_changed_1_3_2_on_a_live_pipeline_exact(any_redis: tuple[str, Any], pg: asyncpg.Connection,
                                                             config: Config, shard_cleanup: None) -> None:
    """N goes 1 → 3 → 2 while writers post: sidecars restarted with the new N pick their shard by pod name,
    sidecars still on the old N keep writing to old shards for a while; the flusher (on the new config)
    drains old shards, and queries count every shard, so nothing is lost or counted twice. On one Redis
    and on a real Redis Cluster (the shards then live on several masters)."""
    redis_url, redis_client = any_redis
    config = make_config(config.pipeline, redis_url, config.database_url)
    pods = [f"web-{i}" for i in range(6)]
    writers = ShardWriters(config)
    flushed: list[PipelineStats] = []

    async def phase(old: int, new: int, rounds: int) -> None:
        cfg_new = sharded(config, new)
        stop = asyncio.Event()
        writers.config = cfg_new

        def tag_of(i: int) -> str:  # half of the pods still run with the old N (a rolling restart)
            n = old if i % 2 else new
            return sidecar_shard_tag(config.pipeline, n, pods[i % len(pods)])

        async def flusher_and_reader() -> None:
            client = await async_client(redis_url, "auto")
            conn = await connect(cfg_new)
            q = Queries.for_config(redis_client, pg, cfg_new)
            try:
                for _ in range(rounds):
                    flushed.append(await flush_all_shards(client, conn, cfg_new, batch_size=2))
                    before = _daily_total(writers.expected)
                    total = (await q.counts(None, DAYS[0], DAYS[-1], "day")).total
                    assert before <= total <= _daily_total(writers.sent), (old, new)
            finally:
                stop.set()
                await client.aclose()
                await conn.close()

        await asyncio.wait_for(asyncio.gather(run_writers(writers, tag_of, stop, 6, seed=new),
                                              flusher_and_reader()), 240)

    try:
        await phase(1, 1, 3)
        await phase(1, 3, 4)
        await phase(3, 2, 4)
    finally:
        await writers.close()
    cfg = sharded(config, 2)
    used = {tag for tag in writers.committers}
    assert len(used) >= 4  # shard 0 and shards of both N=3 and N=2 were written
    if isinstance(redis_client, aioredis.RedisCluster):  # ... and they lived on more than one master
        masters = {redis_client.get_node_from_key(PipelineKeys(cfg.pipeline, tag).dirty).name for tag in used}
        assert len(masters) >= 2, masters
    q = Queries.for_config(redis_client, pg, cfg)
    await check_queries(q, writers.expected)  # the old N=3 shards still hold counts: read
    final = await flush_all_shards(redis_client, pg, cfg)
    assert used <= set(final.shards)  # old shards are flushed with the configured ones
    assert await pg_counters(pg, cfg.pipeline) == writers.expected
    await assert_rollups_exact(pg, cfg.pipeline)
    await assert_all_shards_clean(redis_client, cfg)
    await check_queries(q, writers.expected)

