"""Partitioned vs unpartitioned tables, measured in one run: query p99 and flush rows/s over 13 months of data.

    .venv/bin/python benchmarks/partitions.py             # 395 days (13 monthly partitions + ahead), 3 rounds
    .venv/bin/python benchmarks/partitions.py --quick     # 60 days, 1 round, 100k-counter flushes once
    .venv/bin/python benchmarks/partitions.py --days 395 --flush-size 100000 --repeat 3 --rounds 3

One throwaway PostgreSQL (or ``--database-url``'s server) gets two databases, created by this script and
dropped afterwards: ``unpartitioned`` (today's schema.sql with its ``PARTITION BY`` clauses removed, i.e.
the layout before partitioning) and ``partitioned`` (``migrate``: monthly partitions). Both are filled
with the same data by benchmarks/query.py's generator (a year and a month of hourly, daily and per-user
rows for one pipeline, rollups rebuilt, VACUUM ANALYZE), then for each layout in turn:

- the dashboard queries of benchmarks/query.py (counts by hour/day, uniques, dashboard_snapshot), with
  today's live buckets in Redis, each result checked against the data, p50/p99 per round;
- flush runs of ``--flush-size`` counters over the last 7 days (benchmarks/flush.py's fill and run:
  PipelineFlush, checked exactly) into the same database, rows/s.

Printed: both layouts side by side and the ratio partitioned / unpartitioned (p99: < 1 is faster;
rows/s: > 1 is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import benchlib
import flush as flush_bench
import query as query_bench
import redis.asyncio as aioredis

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.queries import Queries
from analytics_pipeline.flusher.db import connect, create_pool
from analytics_pipeline.flusher.migrate import apply_schema, schema_sql
from analytics_pipeline.flusher.partitions import PARTITIONED, ensure_partitions, month_start, next_month

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


async def measure(layout: str, database_url: str, redis_url: str, redis_pid: int, client: aioredis.Redis,
                  args: argparse.Namespace) -> dict[str, Any]:
    pipeline = f"bench/partitions-{uuid.uuid4().hex[:8]}"
    keys = PipelineKeys(pipeline)
    config = parse_config({"pipeline": pipeline, "redis_url": redis_url, "database_url": database_url})
    now = datetime.now(UTC)
    first_day = now.date() - timedelta(days=args.days)
    started = time.monotonic()
    loader = await asyncpg.connect(database_url, server_settings={
        "statement_timeout": "0", "maintenance_work_mem": "512MB", "timezone": "UTC"})
    try:
        await create_layout(loader, layout, first_day, now.date())
        data = await query_bench.generate_postgres(loader, pipeline, args.days, now.date(), own_database=True)
        partitions = await loader.fetchval("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent "
                                           "WHERE p.relname = 'analytics_user_daily'")
    finally:
        await loader.close()
    live = await query_bench.fill_redis(client, keys, now)
    print(f"[{layout}] generated in {time.monotonic() - started:.0f}s, analytics_user_daily partitions: "
          f"{partitions}", flush=True)
    pool = await create_pool(config, "benchmark partitions", max_size=4)
    result: dict[str, Any] = {"problems": [], "queries": {}, "flush": []}
    try:
        queries = Queries.for_config(client, pool, config)
        day_list = [now.date() - timedelta(days=29 - n) for n in range(30)]
        result["problems"] += await query_bench.check_results(queries, pool, data, live, now, day_list)
        plan: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("counts by hour, 48 h", lambda: queries.counts(None, now - timedelta(hours=47), now, "hour")),
            ("counts by day, 30 days", lambda: queries.counts(None, day_list[0], day_list[-1], "day")),
            ("uniques per day, 30 days", lambda: queries.uniques(None, day_list[0], day_list[-1])),
            ("uniques of one event, 30 days", lambda: queries.uniques("event_03", day_list[0], day_list[-1])),
            ("dashboard_snapshot (48 h, 30 days)", lambda: queries.dashboard_snapshot(now)),
        ]
        for name, call in plan:
            timing = await query_bench.time_query(name, call, args.rounds, args.seconds, 20)
            result["queries"][name] = timing
            print(f"[{layout}] {name:<36} p99 per round: "
                  + ", ".join(f"{benchlib.percentile(s, 99):.2f} ms" for s in timing.rounds), flush=True)
    finally:
        await pool.close()
        await client.delete(*[key async for key in client.scan_iter(match=keys.scan_pattern)])
        await client.srem(PIPELINES_SET, pipeline)
    conn = await connect(config, "benchmark partitions flush")
    raw = aioredis.Redis.from_url(redis_url)  # benchmarks/flush.py's checks read keys as bytes
    try:
        for rep in range(1, args.repeat + 1):
            run = await flush_bench.one_run(config, conn, raw, redis_pid, args.flush_size, rep)
            result["flush"].append(run)
            result["problems"] += run.problems
            print(f"[{layout}] flush {args.flush_size:,} counters rep {rep}: {run.seconds:.2f}s "
                  f"{run.rows_per_s:,.0f} rows/s [{'OK' if run.verified else 'FAIL'}]", flush=True)
    finally:
        await conn.close()
        await raw.aclose()
    return result


async def main_async(args: argparse.Namespace) -> int:
    results: dict[str, dict[str, Any]] = {}
    suffix = uuid.uuid4().hex[:6]
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
                results[layout] = await measure(layout, database_url_for(database_url, names[layout]),
                                                redis_server.url, redis_server.process.pid, client, args)
        finally:
            for name in names.values():  # the databases this run created, and only those
                await admin.execute(f"DROP DATABASE IF EXISTS {name}")
            await admin.close()
            await client.aclose()
    print(f"\nload avg at end: {benchlib.load_average()}\n")
    flat, part = results["unpartitioned"], results["partitioned"]
    rows = []
    for name, timing in flat["queries"].items():
        a, b = timing.p(99).median, part["queries"][name].p(99).median
        rows.append([f"{name} p99 ms", f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"])
    a = benchlib.stat([run.rows_per_s for run in flat["flush"]]).median
    b = benchlib.stat([run.rows_per_s for run in part["flush"]]).median
    rows.append([f"flush {args.flush_size:,} counters, rows/s", f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}"])
    print("Medians over rounds / repetitions:")
    print(benchlib.table(["measure", "unpartitioned", "partitioned", "ratio part/unpart"], rows))
    problems = flat["problems"] + part["problems"]
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
