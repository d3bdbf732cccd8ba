"""Flush benchmark: one flush run of 10k, 100k and 1M distinct counters from Redis into PostgreSQL.

    .venv/bin/python benchmarks/flush.py                    # 10k, 100k, 1M; 3 repetitions each (~3 min)
    .venv/bin/python benchmarks/flush.py --quick            # 10k and 100k, once (~20 s)
    .venv/bin/python benchmarks/flush.py --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python benchmarks/flush.py --sizes 1000000 --days 1   # one bucket of ~1M counters
    .venv/bin/python benchmarks/flush.py --sizes 300000 --shards 1,3   # 1 vs 3 shards flushed concurrently

Redis is a throwaway ``RedisServer``; PostgreSQL a throwaway ``PostgresServer`` (fsync off, like the
test harness) unless ``--database-url`` names one (the benchmark's rows are deleted afterwards).
Each repetition fills a fresh pipeline with exactly what the sidecar writes (bucket hashes with
their TTL, the dirty ZSET scored in ms, ``ap:pipelines``), pipelined HSETs of 1,000 fields: 20 event
types over the last 7 days (``--days``), daily (140 counters) and hourly (3,360) buckets, the rest per-user
daily fields (event type + user id) spread over the 7 days. Then one flush runs in this process
through ``flusher.run.PipelineFlush`` (the code the ``flush`` command runs) with the default batch
size, and its step hook times each phase: wall time, this process's CPU and Redis's CPU per phase,
so the split between Redis, PostgreSQL and Python is visible. Afterwards the PostgreSQL totals are
checked against what was written and Redis must hold nothing of the pipeline but its bookkeeping.

``--shards N[,M]``: the same counters spread over N shards of the pipeline (core/keys.py shard tags), as
N groups of sidecars write them: every shard holds the daily and hourly buckets of all days (the same
PostgreSQL rows, upserted by every shard) and a 1/N share of the users. The flush is then the
``flush`` command's: every shard at once (``flusher.shards.flush_pipeline_shards``, one PostgreSQL
connection per shard, ``shard_concurrency`` = N); the phase split is shown for 1 shard only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import benchlib
import redis.asyncio as aioredis

from analytics_pipeline.core.config import Config, parse_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, shard_tags, user_field
from analytics_pipeline.core.postgres import connect
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.run import PipelineFlush
from analytics_pipeline.flusher.shards import flush_pipeline_shards
from analytics_pipeline.flusher.store import PIPELINE_TABLES

EVENT_TYPES = [f"event_{n:02d}" for n in range(20)]
DAYS = 7
FIELDS_PER_HSET = 1000
# Phases between two step-hook calls: the step the interval ends at names what ran in it.
PHASE_OF_STEP = {"after_lock": "lock", "after_recover": "recover", "after_claim": "claim (Redis)",
                 "after_read": "read (Redis)", "in_transaction": "apply (PostgreSQL)",
                 "after_commit": "commit (PostgreSQL)", "after_cleanup": "cleanup (Redis)",
                 "after_retention": "retention (PostgreSQL)", "end": "backlog report (Redis)"}


@dataclass
class Filled:
    """What a fill wrote: counters and count totals per table, and the seconds it took."""

    counters: int
    daily: int = 0
    hourly: int = 0
    user_daily: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Phase:
    wall: float = 0.0
    cpu: float = 0.0
    redis_cpu: float = 0.0


@dataclass
class FlushRun:
    size: int
    rep: int
    shards: int
    rows: int
    buckets: int
    units: int
    seconds: float
    fill_seconds: float
    peak_rss_mb: float
    phases: dict[str, Phase]
    verified: bool
    problems: list[str]

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


async def fill(client: aioredis.Redis, shards: list[PipelineKeys], counters: int, ttl: int,
               day_count: int = DAYS) -> Filled:
    """Write ``counters`` distinct counters like the sidecar does (over the ``shards`` of one pipeline: each
    with every daily/hourly bucket, and 1/N of the users); returns the expected totals."""
    started = time.monotonic()
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    days = [today - timedelta(days=n) for n in range(day_count)]
    hashes: dict[str, dict[str, int]] = {}
    dirty: dict[str, str] = {}  # bucket key -> its shard's dirty set
    result = Filled(counters)
    made = 0
    for keys in shards:
        for day in days:
            daily = hashes.setdefault(keys.daily(day), {})
            dirty[keys.daily(day)] = keys.dirty
            for i, name in enumerate(EVENT_TYPES):
                daily[name] = 1 + i % 5
                result.daily += daily[name]
                made += 1
            for hour in range(24):
                hourly = hashes.setdefault(keys.hourly(day + timedelta(hours=hour)), {})
                dirty[keys.hourly(day + timedelta(hours=hour))] = keys.dirty
                for i, name in enumerate(EVENT_TYPES):
                    hourly[name] = 1 + (i + hour) % 5
                    result.hourly += hourly[name]
                    made += 1
    if made > counters:
        raise SystemExit(f"at least {made} counters are needed for the daily and hourly buckets")
    remaining = counters - made
    result.rows = {"analytics_daily": day_count * len(EVENT_TYPES),
                   "analytics_hourly": day_count * 24 * len(EVENT_TYPES), "analytics_user_daily": remaining}
    for index, day in enumerate(days):
        share = remaining // day_count + (1 if index < remaining % day_count else 0)
        for i in range(share):
            count = 1 + i % 3
            user = i // len(EVENT_TYPES)
            keys = shards[user % len(shards)]  # a user's fields of a day all in one shard
            bucket = hashes.setdefault(keys.user_daily(day), {})
            dirty[keys.user_daily(day)] = keys.dirty
            bucket[user_field(EVENT_TYPES[i % len(EVENT_TYPES)], f"user-{user:07d}")] = count
            result.user_daily += count
    now_ms = int(time.time() * 1000)
    async with client.pipeline(transaction=False) as pipe:
        queued = 0
        for key, fields in hashes.items():
            items = list(fields.items())
            for start in range(0, len(items), FIELDS_PER_HSET):
                pipe.hset(key, mapping=dict(items[start:start + FIELDS_PER_HSET]))
                queued += 1
            pipe.expire(key, ttl)
            pipe.zadd(dirty[key], {key: now_ms}, nx=True)
            queued += 2
            if queued >= 200:
                await pipe.execute()
                queued = 0
        pipe.sadd(PIPELINES_SET, *(keys.tag for keys in shards))
        await pipe.execute()
    result.seconds = time.monotonic() - started
    return result


async def verify(conn: asyncpg.Connection, client: aioredis.Redis, shards: list[PipelineKeys],
                 filled: Filled) -> list[str]:
    """Problems found: PostgreSQL rows and totals must equal what was filled; Redis must be drained."""
    problems = []
    for table, expected in (("analytics_daily", filled.daily), ("analytics_hourly", filled.hourly),
                            ("analytics_user_daily", filled.user_daily)):
        row = await conn.fetchrow(f"SELECT count(*) AS n, coalesce(sum(count), 0) AS total FROM {table} "
                                  "WHERE pipeline = $1", shards[0].pipeline)
        if int(row["total"]) != expected or int(row["n"]) != filled.rows[table]:
            problems.append(f"{table}: {row['n']} rows / total {row['total']}, expected "
                            f"{filled.rows[table]} rows / total {expected}")
    left = [key for keys in shards async for key in client.scan_iter(match=keys.scan_pattern, count=1000)]
    bookkeeping = {key.encode() for keys in shards for key in (keys.claim_seq, keys.lock)}
    stray = [key for key in left if key not in bookkeeping]
    if stray:
        problems.append(f"Redis still holds {len(stray)} keys of the pipeline, e.g. {stray[:3]}")
    return problems


async def delete_rows(conn: asyncpg.Connection, pipeline: str) -> None:
    """Remove the run's rows and vacuum, so the next repetition does not insert among dead index entries."""
    for table in PIPELINE_TABLES:
        await conn.execute(f"DELETE FROM {table} WHERE pipeline = $1", pipeline)
        await conn.execute(f"VACUUM {table}")


def reset_peak_rss() -> None:
    """Reset VmHWM so the flush's peak is not the fill's (Linux: write 5 to clear_refs)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


async def one_run(config: Config, conn: asyncpg.Connection, client: aioredis.Redis, redis_pid: int,
                  size: int, rep: int, days: int = DAYS, shards: int = 1) -> FlushRun:
    pipeline = f"bench/flush-{size}-{uuid.uuid4().hex[:8]}"
    keys = PipelineKeys(pipeline)
    shard_keys = [PipelineKeys(pipeline, tag) for tag in shard_tags(pipeline, shards)]
    config = parse_config({**config.as_dict(), "pipeline": pipeline, "counters": {"shards": shards},
                           "flush": {"shard_concurrency": shards}})
    filled = await fill(client, shard_keys, size, config.counters.ttl_seconds, days)
    marks: list[tuple[str, float, float, float]] = []

    def mark(step: str) -> None:
        marks.append((step, time.perf_counter(), time.process_time(), benchlib.cpu_seconds(redis_pid)))

    async def hook(step: str) -> None:
        mark(step)

    reset_peak_rss()
    mark("start")
    if shards == 1:
        stats = await PipelineFlush(client, conn, config, keys.pipeline, hook=hook).run()
    else:  # what the flush command does: every shard at once, one connection each
        stats = await flush_pipeline_shards(client, conn, config, pipeline,
                                            connect=lambda: connect(config, "benchmark flush"))
    mark("end")
    peak = benchlib.memory_mb(os.getpid())["VmHWM"]
    phases: dict[str, Phase] = {}
    for (_, wall0, cpu0, redis0), (step, wall1, cpu1, redis1) in itertools.pairwise(marks):
        phase = phases.setdefault(PHASE_OF_STEP.get(step, step), Phase())
        phase.wall += wall1 - wall0
        phase.cpu += cpu1 - cpu0
        phase.redis_cpu += redis1 - redis0
    problems = [f"flush failed: {stats.error}"] if stats.error else []
    problems += await verify(conn, client, shard_keys, filled)
    if stats.rows != size:
        problems.append(f"flush reported {stats.rows} rows, expected {size}")
    await delete_rows(conn, keys.pipeline)
    await client.delete(*(k for keys in shard_keys for k in (keys.claim_seq, keys.lock)))
    await client.srem(PIPELINES_SET, *(keys.tag for keys in shard_keys))
    return FlushRun(size, rep, shards, stats.rows, stats.buckets, stats.units, stats.duration_s, filled.seconds, peak,
                    phases, not problems, problems)


async def main_async(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([10_000, 100_000] if args.quick else
                                                                          [10_000, 100_000, 1_000_000])
    repeat = args.repeat or (1 if args.quick else 3)
    if args.unserialized:
        from analytics_pipeline.flusher import store

        async def no_lock(conn: asyncpg.Connection, pipeline: str) -> None:
            return None

        store.lock_pipeline = no_lock  # type: ignore[assignment]
        print("UNSERIALIZED: the shards' applies run in parallel without the pipeline's advisory lock\n")
    shard_counts = [int(s) for s in args.shards.split(",")]
    with benchlib.services(args.database_url, "bench-flush-") as (redis_server, database_url, origin):
        config = parse_config({"pipeline": "bench/flush", "redis_url": redis_server.url,
                               "database_url": database_url})
        client = aioredis.Redis.from_url(redis_server.url)
        conn = await connect(config, "benchmark flush")
        try:
            await benchlib.print_services_header("flush benchmark", client, conn, origin)
            await apply_schema(conn)
            assert redis_server.process is not None
            print(f"batch size {config.flush.batch_size} buckets per unit (flush.batch_size default); "
                  f"{repeat} repetition(s) per size; a fresh pipeline per repetition (rows are inserted)\n")
            runs: list[FlushRun] = []
            for size, shards in itertools.product(sizes, shard_counts):
                for rep in range(1, repeat + 1):
                    run = await one_run(config, conn, client, redis_server.process.pid, size, rep, args.days, shards)
                    runs.append(run)
                    split = "  ".join(f"{name} {phase.wall:.2f}s" for name, phase in run.phases.items()
                                      if phase.wall >= 0.005)
                    print(f"  {size:>9,} counters {shards} shard(s) rep {rep}: fill {run.fill_seconds:5.1f}s  "
                          f"flush {run.seconds:6.2f}s {run.rows_per_s:>9,.0f} rows/s  {run.units} unit(s), "
                          f"{run.buckets} buckets  "
                          f"peak RSS {run.peak_rss_mb:.0f} MiB  [{'OK' if run.verified else 'FAIL'}]  {split}",
                          flush=True)
                    for problem in run.problems:
                        print(f"      FAIL {problem}")
        finally:
            await conn.close()
            await client.aclose()
    print(f"\nload avg at end: {benchlib.load_average()}\n")
    report(runs, sizes, shard_counts)
    return 0 if all(run.verified for run in runs) else 1


def report(runs: list[FlushRun], sizes: list[int], shard_counts: list[int]) -> None:
    s = benchlib.stat
    rows = []
    for size, shards in itertools.product(sizes, shard_counts):
        mine = [r for r in runs if r.size == size and r.shards == shards]
        rows.append([f"{size:,}", str(shards), s([r.seconds for r in mine]).show("{:.2f}"),
                     s([r.rows_per_s for r in mine]).show(),
                     str(mine[0].units), str(mine[0].buckets), s([r.peak_rss_mb for r in mine]).show("{:.0f}"),
                     "yes" if all(r.verified for r in mine) else "NO"])
    print("Medians over repetitions, (min..max):")
    print(benchlib.table(["counters", "shards", "flush s", "rows/s", "units", "buckets", "peak RSS MiB",
                          "totals exact"], rows))
    print()
    for size in sizes:
        mine = [r for r in runs if r.size == size and r.shards == 1]
        if not mine:
            continue
        names = list(dict.fromkeys(name for r in mine for name in r.phases))
        total = benchlib.stat([r.seconds for r in mine]).median
        print(f"Where the time goes at {size:,} counters (median seconds; wall / flusher CPU / Redis CPU):")
        lines = []
        for name in names:
            wall = benchlib.stat([r.phases.get(name, Phase()).wall for r in mine]).median
            if wall < 0.001:
                continue
            cpu = benchlib.stat([r.phases.get(name, Phase()).cpu for r in mine]).median
            redis_cpu = benchlib.stat([r.phases.get(name, Phase()).redis_cpu for r in mine]).median
            lines.append([name, f"{wall:.3f}", f"{100 * wall / total:.0f}%" if total else "-", f"{cpu:.3f}",
                          f"{redis_cpu:.3f}"])
        print(benchlib.table(["phase", "wall s", "share", "flusher CPU s", "Redis CPU s"], lines))
        print()
    biggest = max(sizes)
    best = benchlib.stat([r.rows_per_s for r in runs if r.size == biggest and r.shards == min(shard_counts)])
    if biggest >= 1_000_000:
        verdict = "MET " if best.median >= 100_000 else "MISS"
        print(f"  {verdict} flush at {biggest:,} counters: {best.show()} rows/s (target >= 100,000 rows/s)")
    print(f"  {'MET ' if all(r.verified for r in runs) else 'FAIL'} PostgreSQL totals equal what was written, "
          f"Redis drained ({sum(r.verified for r in runs)}/{len(runs)} runs)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k and 100k counters, once")
    parser.add_argument("--sizes", help="comma-separated counter counts (default 10000,100000,1000000)")
    parser.add_argument("--repeat", type=int, help="repetitions per size (default 3; --quick: 1)")
    parser.add_argument("--unserialized", action="store_true",
                        help="measurement only: drop the pipeline's advisory lock, so the shards' applies run in "
                             "parallel (what the lock costs; rollups are NOT exact then, counters still are)")
    parser.add_argument("--shards", default="1",
                        help="comma-separated shard counts to flush the same counters from (default 1; e.g. 1,3)")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument("--days", type=int, default=DAYS,
                        help=f"days the counters are spread over (default {DAYS}); --days 1 puts every per-user "
                             "counter in one bucket, which the flusher reads in HSCAN pieces above 200,000")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
