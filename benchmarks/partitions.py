"""Partitioned vs unpartitioned tables, measured in one run: query p99 and flush rows/s over 13 months of data.

    .venv/bin/python benchmarks/partitions.py             # 395 days (13 monthly partitions + ahead), 3 rounds
    .venv/bin/python benchmarks/partitions.py --quick     # 60 days, 1 round, 100k-counter flushes once
    .venv/bin/python benchmarks/partitions.py --days 395 --flush-size 100000 --repeat 3 --rounds 3

One throwaway PostgreSQL (or ``--database-url``'s server) gets two databases, created by this script and
dropped afterwards: ``unpartitioned`` (today's schema.sql with its ``PARTITION BY`` clauses removed, i.e.
the layout before partitioning) and ``partitioned`` (``migrate``: monthly partitions). Both are filled
with the same data by benchmarks/query.py's generator (a year and a month of hourly, daily and per-user
rows for one pipeline, rollups rebuilt, VACUUM ANALYZE), then:

- the dashboard queries of benchmarks/query.py (counts by hour/day, uniques, dashboard_snapshot), with
  today's live buckets in Redis, each result checked against the data, p50 and p99 per round;
- flush runs of ``--flush-size`` counters over the last 7 days (benchmarks/flush.py's fill and run:
  PipelineFlush, checked exactly) into the same database, rows/s.

Queries and flushes alternate between the layouts (each query's rounds, each flush repetition, the
order flipped every round) so both see the same machine load. Printed: both layouts side by side and
the ratio partitioned / unpartitioned (p50/p99: < 1 is faster; rows/s: > 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import benchlib
import flush as flush_bench
import query as query_bench
import redis.asyncio as aioredis
from query import Timing

from analytics_pipeline.core.config import Config, parse_config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.postgres import connect, create_pool
from analytics_pipeline.flusher.migrate import apply_schema, schema_sql
from analytics_pipeline.flusher.partitions import PARTITIONED, ensure_partitions, month_start, next_month
from analytics_pipeline.reads.queries import Queries

LAYOUTS = ("unpartitioned", "partitioned")


def database_url_for(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_layout(conn: asyncpg.Connection, layout: str, first_day: Any, today: Any) -> None:
    """The schema of ``layout``; for the partitioned one, a partition for every month of the data."""
    if layout == "unpartitioned":
        await conn.execute(re.sub(r"\)\s*PARTITION BY RANGE \(\w+\);", ");", schema_sql()))
        return
    await apply_schema(conn)
    months, month = [], month_start(first_day)
    while month <= today:
        months.append(month)
        month = next_month(month)
    await ensure_partitions(conn, [(table, m) for table in PARTITIONED for m in months])


@dataclass
class Layout:
    """One layout's database, filled, with its pipeline's live Redis buckets and a query pool."""

    name: str
    config: Config
    keys: PipelineKeys
    data: Any
    live: dict[str, Any]
    pool: asyncpg.Pool
    queries: dict[str, Timing] = field(default_factory=dict)
    flushes: list[Any] = field(default_factory=list)


async def set_up(layout: str, database_url: str, redis_url: str, client: aioredis.Redis, now: datetime,
                 days: int) -> Layout:
    """Create and fill one layout's database (benchmarks/query.py's generator) and today's Redis buckets."""
    pipeline = f"bench/partitions-{uuid.uuid4().hex[:8]}"
    keys = PipelineKeys(pipeline)
    config = parse_config({"pipeline": pipeline, "redis_url": redis_url, "database_url": database_url})
    started = time.monotonic()
    loader = await asyncpg.connect(database_url, server_settings={
        "statement_timeout": "0", "maintenance_work_mem": "512MB", "timezone": "UTC"})
    try:
        await create_layout(loader, layout, now.date() - timedelta(days=days), now.date())
        data = await query_bench.generate_postgres(loader, pipeline, days, now.date(), own_database=True)
        partitions = await loader.fetchval("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
                                           "WHERE p.relname = 'analytics_user_daily'")
    finally:
        await loader.close()
    live = await query_bench.fill_redis(client, keys, now)
    print(f"[{layout}] generated in {time.monotonic() - started:.0f}s, analytics_user_daily partitions: "
          f"{partitions}", flush=True)
    return Layout(layout, config, keys, data, live, await create_pool(config, "benchmark partitions", max_size=4))


def query_plan(queries: Queries, now: datetime) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """benchmarks/query.py's queries."""
    day_list = [now.date() - timedelta(days=29 - n) for n in range(30)]
    return [
        ("counts by hour, 48 h", lambda: queries.counts(None, now - timedelta(hours=47), now, "hour")),
        ("counts by day, 30 days", lambda: queries.counts(None, day_list[0], day_list[-1], "day")),
        ("uniques per day, 30 days", lambda: queries.uniques(None, day_list[0], day_list[-1])),
        ("uniques of one event, 30 days", lambda: queries.uniques("event_03", day_list[0], day_list[-1])),
        ("dashboard_snapshot (48 h, 30 days)", lambda: queries.dashboard_snapshot(now)),
    ]


async def measure(layouts: list[Layout], client: aioredis.Redis, redis_url: str, redis_pid: int, now: datetime,
                  args: argparse.Namespace) -> list[str]:
    """Every query, then every flush, alternating the layouts (and their order) so both see the same load."""
    problems: list[str] = []
    plans = {}
    for layout in layouts:
        queries = Queries.for_config(client, layout.pool, layout.config)
        day_list = [now.date() - timedelta(days=29 - n) for n in range(30)]
        problems += await query_bench.check_results(queries, layout.pool, layout.data, layout.live, now, day_list)
        plans[layout.name] = query_plan(queries, now)
    for round_number in range(args.rounds):
        order = layouts if round_number % 2 == 0 else layouts[::-1]
        for index in range(len(plans[layouts[0].name])):
            for layout in order:
                name, call = plans[layout.name][index]
                timing = await query_bench.time_query(name, call, 1, args.seconds, 20)
                layout.queries.setdefault(name, Timing(name, [])).rounds += timing.rounds
                print(f"[{layout.name}] round {round_number + 1} {name:<36} p50 "
                      f"{benchlib.percentile(timing.rounds[0], 50):7.2f} ms p99 "
                      f"{benchlib.percentile(timing.rounds[0], 99):7.2f} ms", flush=True)
    raw = aioredis.Redis.from_url(redis_url)  # benchmarks/flush.py's checks read keys as bytes
    try:
        for rep in range(1, args.repeat + 1):
            for layout in layouts if rep % 2 else layouts[::-1]:
                conn = await connect(layout.config, "benchmark partitions flush")
                try:
                    run = await flush_bench.one_run(layout.config, conn, raw, redis_pid, args.flush_size, rep)
                finally:
                    await conn.close()
                layout.flushes.append(run)
                problems += run.problems
                print(f"[{layout.name}] flush {args.flush_size:,} counters rep {rep}: {run.seconds:.2f}s "
                      f"{run.rows_per_s:,.0f} rows/s [{'OK' if run.verified else 'FAIL'}]", flush=True)
    finally:
        await raw.aclose()
    return problems


async def main_async(args: argparse.Namespace) -> int:
    suffix = uuid.uuid4().hex[:6]
    layouts: list[Layout] = []
    problems: list[str] = []
    now = datetime.now(UTC)
    with benchlib.services(args.database_url, "bench-partitions-") as (redis_server, database_url, origin):
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        admin = await asyncpg.connect(database_url)
        names = {layout: f"bench_{layout}_{suffix}" for layout in LAYOUTS}
        try:
            await benchlib.print_services_header("partitions benchmark", client, admin, origin)
            print(f"{args.days} days of data; {args.rounds} round(s) of {args.seconds:.0f}s per query; "
                  f"{args.repeat} flush(es) of {args.flush_size:,} counters per layout\n", flush=True)
            for layout in LAYOUTS:
                await admin.execute(f"CREATE DATABASE {names[layout]}")
            assert redis_server.process is not None
            for layout in LAYOUTS:
                layouts.append(await set_up(layout, database_url_for(database_url, names[layout]), redis_server.url,
                                            client, now, args.days))
            problems += await measure(layouts, client, redis_server.url, redis_server.process.pid, now, args)
        finally:
            for layout in layouts:
                await layout.pool.close()
            for name in names.values():  # the databases this run created, and only those
                await admin.execute(f"DROP DATABASE IF EXISTS {name}")
            await admin.close()
            await client.aclose()
    print(f"\nload avg at end: {benchlib.load_average()}\n")
    flat, part = layouts
    rows = []
    for name, timing in flat.queries.items():
        for pct in (50, 99):
            ratios = [benchlib.percentile(b, pct) / benchlib.percentile(a, pct)
                      for a, b in zip(timing.rounds, part.queries[name].rounds, strict=True)]
            rows.append([f"{name} p{pct} ms", timing.p(pct).show("{:.2f}"),
                         part.queries[name].p(pct).show("{:.2f}"), benchlib.stat(ratios).show("{:.2f}")])
    ratios = [b.rows_per_s / a.rows_per_s for a, b in zip(flat.flushes, part.flushes, strict=True)]
    rows.append([f"flush {args.flush_size:,} counters, rows/s",
                 benchlib.stat([run.rows_per_s for run in flat.flushes]).show(),
                 benchlib.stat([run.rows_per_s for run in part.flushes]).show(), benchlib.stat(ratios).show("{:.2f}")])
    print("Medians over rounds / repetitions, (min..max); the ratio is taken within each round or repetition")
    print("(both layouts back to back), then its median:")
    print(benchlib.table(["measure", "unpartitioned", "partitioned", "ratio part/unpart"], rows))
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"  {'MET ' if not problems else 'FAIL'} every query result and every flush equals the data")
    return 0 if not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 60 days, 1 round, 1 flush")
    parser.add_argument("--days", type=int, help="days of data (default 395: 13 months + this one)")
    parser.add_argument("--rounds", type=int, help="timing rounds per query (default 3; --quick: 1)")
    parser.add_argument("--repeat", type=int, help="flushes per layout (default 3; --quick: 1)")
    parser.add_argument("--flush-size", type=int, default=100_000, help="counters per flush (default 100,000)")
    parser.add_argument("--database-url", help="use this PostgreSQL server (two databases are created, then dropped)")
    args = parser.parse_args()
    args.days = args.days or (60 if args.quick else 395)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.seconds = 2.0 if args.quick else 4.0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
