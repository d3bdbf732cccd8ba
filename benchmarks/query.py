"""Query benchmark: the dashboard's queries through reads/queries.py over a year of data.

    .venv/bin/python benchmarks/query.py            # 3 rounds per query (~3 min with data generation)
    .venv/bin/python benchmarks/query.py --quick    # 30 days of per-user data, 1 round (~30 s)
    .venv/bin/python benchmarks/query.py --database-url postgresql://postgres@127.0.0.1:5432/test

PostgreSQL (a throwaway ``PostgresServer`` unless ``--database-url``; the benchmark's rows are
deleted afterwards) gets, for one pipeline, generated in SQL with ``generate_series``:

- ``analytics_hourly``: every hour of the last 365 days x 20 event types (175,200 rows);
- ``analytics_daily``: the same per day (7,300 rows);
- ``analytics_user_daily``: 100,000 users of whom 10% are active each day (a sliding window, so 30
  days see far more distinct users than one day), each with 2 event types: 20,000 rows a day,
  7.3M rows for the year, up to yesterday.

A throwaway Redis holds the live (unflushed) buckets of today, as the sidecar writes them: every
hour so far x 20 event types, today's daily bucket and today's per-user bucket with 10,000 users
x 2 event types (a day the flusher did not run: the heavy case for uniques).

Then ``Queries`` (the code behind /v1/counts, /v1/uniques and the dashboard) is timed, each query
warmed up and run for a few seconds per round: counts by hour for 48 h, counts by day for 30 days,
uniques per day for 30 days (all events and one event type) and ``dashboard_snapshot``. Printed:
p50 and p99 per round, medians over rounds (min..max). Every result is checked against the
generated data (exact totals).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import benchlib
import redis.asyncio as aioredis

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, user_field
from analytics_pipeline.core.postgres import create_pool
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.partitions import PARTITIONED, ensure_partitions, month_start
from analytics_pipeline.flusher.store import PIPELINE_TABLES, rebuild_rollups
from analytics_pipeline.reads.queries import Queries

EVENT_TYPES = 20
USERS = 100_000
ACTIVE_SHARE = 10  # percent of users active on a day
EVENTS_PER_USER = 2
REDIS_USERS = 10_000

# Hourly counts are a function of (hour number, event number); daily counts their sum per day.
_HOURLY_SQL = """
INSERT INTO analytics_hourly (pipeline, event_type, hour, count)
SELECT $1, 'event_' || lpad(e::text, 2, '0'), h, 1 + (e * 7 + extract(hour FROM h)::int) % 13
FROM generate_series($2::timestamptz, $3::timestamptz, interval '1 hour') AS h, generate_series(0, $4 - 1) AS e
"""
_DAILY_SQL = """
INSERT INTO analytics_daily (pipeline, event_type, day, count)
SELECT pipeline, event_type, (hour AT TIME ZONE 'UTC')::date, sum(count) FROM analytics_hourly
WHERE pipeline = $1 GROUP BY pipeline, event_type, (hour AT TIME ZONE 'UTC')::date
"""
# Day k (days since 2000-01-01): users (k * 3331 + j) mod USERS for j < active; each with two
# distinct event types. Rows are generated in primary-key order (user, event, day) per day batch.
_USER_SQL = """
INSERT INTO analytics_user_daily (pipeline, user_id, event_type, day, count)
SELECT $1, 'user-' || lpad(((k * 3331 + j) % $4)::text, 6, '0'),
       'event_' || lpad(((((k * 3331 + j) % $4) + k + x * (1 + ((k * 3331 + j) % $4) % 19)) % $5)::text, 2, '0'),
       d, 1 + (j + x) % 4
FROM generate_series($2::date, $2::date + ($3 - 1), interval '1 day') AS d,
     LATERAL (SELECT (d::date - date '2000-01-01') AS k) AS day_number,
     generate_series(0, $6 - 1) AS j, generate_series(0, $7 - 1) AS x
"""


@dataclass
class Dataset:
    """The generated data's shape, for the exactness checks."""

    pipeline: str
    first_day: date
    last_pg_day: date
    today: date
    pg_days: int
    active: int


def user_name(number: int) -> str:
    return f"user-{number:06d}"


def event_name(number: int) -> str:
    return f"event_{number:02d}"


async def generate_postgres(conn: asyncpg.Connection, pipeline: str, days: int, today: date, *,
                            own_database: bool) -> Dataset:
    """Generate the year in SQL. In a database of our own the per-user table's indexes are dropped for
    the load and rebuilt from their recorded definitions (minutes faster); elsewhere rows go in by week."""
    first_day = today - timedelta(days=days)
    last_pg_day = today - timedelta(days=1)
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    end = datetime(last_pg_day.year, last_pg_day.month, last_pg_day.day, 23, tzinfo=UTC)
    active = USERS * ACTIVE_SHARE // 100
    # rows written here, not by the flusher: their months' partitions first (no-op on unpartitioned tables)
    months = {month_start(first_day + timedelta(days=n)) for n in range(days + 1)}
    await ensure_partitions(conn, [(table, month) for table in PARTITIONED for month in months])
    # one year of hourly data for every event type, then its daily sums
    await conn.execute(_HOURLY_SQL, pipeline, start, end, EVENT_TYPES)
    await conn.execute(_DAILY_SQL, pipeline)
    rebuild: list[str] = []
    if own_database:
        constraints = await conn.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = 'analytics_user_daily'::regclass AND contype = 'p'")
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'analytics_user_daily'")
        primary = {row["conname"] for row in constraints}
        for row in constraints:
            await conn.execute(f"ALTER TABLE analytics_user_daily DROP CONSTRAINT {row['conname']}")
            rebuild.append(f"ALTER TABLE analytics_user_daily ADD CONSTRAINT {row['conname']} {row['def']}")
        for row in indexes:
            if row["indexname"] not in primary:
                await conn.execute(f"DROP INDEX {row['indexname']}")
                rebuild.append(row["indexdef"])
        await conn.execute(_USER_SQL, pipeline, first_day, days, USERS, EVENT_TYPES, active, EVENTS_PER_USER)
        for statement in rebuild:
            await conn.execute(statement)
        after = {row["indexname"]: row["indexdef"] for row in await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'analytics_user_daily'")}
        if sorted(after.values()) != sorted(row["indexdef"] for row in indexes):
            raise SystemExit(f"rebuilt indexes differ from the schema's: {after}")
    else:
        for week in range(0, days, 7):
            await conn.execute(_USER_SQL, pipeline, first_day + timedelta(days=week), min(7, days - week), USERS,
                               EVENT_TYPES, active, EVENTS_PER_USER)
    # the rows went in behind the flusher's back: compute the uniques rollups it would have kept
    await rebuild_rollups(conn, pipeline)
    for table in ("analytics_hourly", "analytics_daily", "analytics_user_daily", "analytics_daily_uniques",
                  "analytics_user_last_seen"):
        await conn.execute(f"VACUUM (ANALYZE) {table}")
    return Dataset(pipeline, first_day, last_pg_day, today, days, active)


def redis_users(today: date) -> list[tuple[str, str]]:
    """Today's (user, event) pairs in Redis: REDIS_USERS users from today's window, two events each."""
    k = (today - date(2000, 1, 1)).days  # today's window, as the SQL would generate it
    pairs = []
    for j in range(REDIS_USERS):
        user = (k * 3331 + j) % USERS
        first = (user + today.toordinal()) % EVENT_TYPES
        pairs.append((user_name(user), event_name(first)))
        pairs.append((user_name(user), event_name((first + 1 + user % 19) % EVENT_TYPES)))
    return pairs


async def fill_redis(client: aioredis.Redis, keys: PipelineKeys, now: datetime) -> dict[str, Any]:
    """Today's live buckets as the sidecar writes them; returns the expected Redis-side totals."""
    today = now.date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
    hourly_total = 0
    per_hour: dict[datetime, int] = {}
    daily: dict[str, int] = {}
    now_ms = int(time.time() * 1000)
    async with client.pipeline(transaction=False) as pipe:
        for hour in range(now.hour + 1):
            moment = midnight + timedelta(hours=hour)
            fields = {event_name(e): 1 + (e + hour) % 3 for e in range(EVENT_TYPES)}
            for name, count in fields.items():
                daily[name] = daily.get(name, 0) + count
            per_hour[moment] = sum(fields.values())
            hourly_total += per_hour[moment]
            pipe.hset(keys.hourly(moment), mapping=fields)
            pipe.zadd(keys.dirty, {keys.hourly(moment): now_ms}, nx=True)
        pipe.hset(keys.daily(midnight), mapping=daily)
        pipe.zadd(keys.dirty, {keys.daily(midnight): now_ms}, nx=True)
        pairs = redis_users(today)
        for start in range(0, len(pairs), 1000):
            pipe.hset(keys.user_daily(midnight), mapping={user_field(e, u): 1 for u, e in pairs[start:start + 1000]})
        pipe.zadd(keys.dirty, {keys.user_daily(midnight): now_ms}, nx=True)
        pipe.sadd(PIPELINES_SET, keys.pipeline)
        await pipe.execute()
    return {"per_hour": per_hour, "daily": sum(daily.values()), "users": {u for u, _ in pairs}}


async def expected_uniques(conn: asyncpg.Connection, pipeline: str, days: list[date],
                           live_users: set[str], today: date) -> tuple[list[int], int]:
    """Per-day and whole-range distinct users straight from the data (the reference for the checks)."""
    rows = await conn.fetch("SELECT day, user_id FROM analytics_user_daily WHERE pipeline = $1 AND day >= $2 "
                            "AND day <= $3", pipeline, days[0], days[-1])
    per_day: dict[date, set[str]] = {}
    for row in rows:
        per_day.setdefault(row["day"], set()).add(row["user_id"])
    per_day.setdefault(today, set()).update(live_users)
    everyone = set().union(*per_day.values())
    return [len(per_day.get(d, ())) for d in days], len(everyone)


@dataclass
class Timing:
    name: str
    rounds: list[list[float]]

    def p(self, pct: float) -> benchlib.Stat:
        return benchlib.stat([benchlib.percentile(samples, pct) for samples in self.rounds])


async def time_query(name: str, call: Callable[[], Awaitable[Any]], rounds: int, seconds: float,
                     min_samples: int) -> Timing:
    for _ in range(3):
        await call()
    timing = Timing(name, [])
    for _ in range(rounds):
        samples: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(samples) < min_samples:
            started = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - started) * 1000)
        timing.rounds.append(samples)
    return timing


async def main_async(args: argparse.Namespace) -> int:
    days = args.days or (30 if args.quick else 365)
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = 2.0 if args.quick else 5.0
    pipeline = f"bench/query-{uuid.uuid4().hex[:8]}"
    keys = PipelineKeys(pipeline)
    problems: list[str] = []
    with benchlib.services(args.database_url, "bench-query-") as (redis_server, database_url, origin):
        config = parse_config({"pipeline": pipeline, "redis_url": redis_server.url, "database_url": database_url})
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        pool = await create_pool(config, "benchmark query", max_size=4)
        conn = await pool.acquire()
        try:
            await benchlib.print_services_header("query benchmark", client, conn, origin)
            await apply_schema(conn)
            now = datetime.now(UTC)
            started = time.monotonic()
            loader = await asyncpg.connect(database_url, server_settings={
                "statement_timeout": "0", "maintenance_work_mem": "512MB", "timezone": "UTC"})
            try:
                data = await generate_postgres(loader, pipeline, days, now.date(),
                                               own_database=args.database_url is None)
            finally:
                await loader.close()
            live = await fill_redis(client, keys, now)
            sizes = {t: await conn.fetchval(f"SELECT count(*) FROM {t} WHERE pipeline = $1", pipeline)
                     for t in ("analytics_hourly", "analytics_daily", "analytics_user_daily")}
            print(f"generated in {time.monotonic() - started:.1f}s: " + ", ".join(f"{t} {n:,} rows"
                                                                               for t, n in sizes.items())
                  + f"; Redis: {now.hour + 1} hourly buckets, today's daily bucket, "
                  f"{len(live['users']):,} users in today's per-user bucket\n", flush=True)
            await pool.release(conn)
            conn = None
            queries = Queries.for_config(client, pool, config)
            day_list = [now.date() - timedelta(days=29 - n) for n in range(30)]
            problems += await check_results(queries, pool, data, live, now, day_list)
            plan: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("counts by hour, 48 h", lambda: queries.counts(None, now - timedelta(hours=47), now, "hour")),
                ("counts by day, 30 days", lambda: queries.counts(None, day_list[0], day_list[-1], "day")),
                ("uniques per day, 30 days", lambda: queries.uniques(None, day_list[0], day_list[-1])),
                ("uniques of one event, 30 days", lambda: queries.uniques("event_03", day_list[0],
                                                                         day_list[-1])),
                ("dashboard_snapshot (48 h, 30 days)", lambda: queries.dashboard_snapshot(now)),
            ]
            timings = []
            for name, call in plan:
                timing = await time_query(name, call, rounds, seconds, 20)
                timings.append(timing)
                print("  " + name.ljust(36) + "  ".join(
                    f"round {i + 1}: p50 {benchlib.percentile(s, 50):7.2f} ms p99 {benchlib.percentile(s, 99):7.2f}"
                    f" ms ({len(s)} runs)" for i, s in enumerate(timing.rounds)), flush=True)
        finally:
            if conn is not None:
                await pool.release(conn)
            async with pool.acquire() as cleanup:
                for table in PIPELINE_TABLES:
                    await cleanup.execute(f"DELETE FROM {table} WHERE pipeline = $1", pipeline)
            await pool.close()
            await client.aclose()
    print(f"\nload avg at end: {benchlib.load_average()}\n")
    print("Medians over rounds, (min..max), milliseconds:")
    print(benchlib.table(["query", "p50 ms", "p99 ms", "runs/round"],
                         [[t.name, t.p(50).show("{:.2f}"), t.p(99).show("{:.2f}"),
                           str(min(len(s) for s in t.rounds))] for t in timings]))
    print()
    for t in timings:
        p99 = t.p(99)
        print(f"  {'MET ' if p99.median <= 50 else 'MISS'} {t.name:<36} p99 {p99.median:7.2f} ms  (target <= 50 ms)")
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"  {'MET ' if not problems else 'FAIL'} every result equals the generated data")
    return 0 if not problems else 1


async def check_results(queries: Queries, pool: asyncpg.Pool, data: Dataset, live: dict[str, Any],
                        now: datetime, day_list: list[date]) -> list[str]:
    """Compare each query's answer with the generated data; a list of mismatches."""
    problems = []
    async with pool.acquire() as conn:
        hours = [now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=47 - n) for n in range(48)]
        stored = {row["hour"]: int(row["n"]) for row in await conn.fetch(
            "SELECT hour, sum(count) AS n FROM analytics_hourly WHERE pipeline = $1 AND hour >= $2 GROUP BY hour",
            data.pipeline, hours[0])}
        want_hours = [stored.get(h, 0) + live["per_hour"].get(h, 0) for h in hours]
        daily = {row["day"]: int(row["n"]) for row in await conn.fetch(
            "SELECT day, sum(count) AS n FROM analytics_daily WHERE pipeline = $1 AND day >= $2 GROUP BY day",
            data.pipeline, day_list[0])}
        want_days = [daily.get(d, 0) + (live["daily"] if d == data.today else 0) for d in day_list]
        want_uniques, want_total = await expected_uniques(conn, data.pipeline, day_list, live["users"], data.today)
    got = await queries.counts(None, hours[0], hours[-1], "hour")
    if [p.count for p in got.points] != want_hours:
        problems.append("counts by hour differ from the data")
    got = await queries.counts(None, day_list[0], day_list[-1], "day")
    if [p.count for p in got.points] != want_days:
        problems.append("counts by day differ from the data")
    uniques = await queries.uniques(None, day_list[0], day_list[-1])
    if [p.count for p in uniques.points] != want_uniques or uniques.distinct_total != want_total:
        problems.append(f"uniques differ: got total {uniques.distinct_total}, want {want_total}")
    snapshot = await queries.dashboard_snapshot(now)
    if snapshot.uniques != want_uniques or snapshot.distinct_users != want_total:
        problems.append("dashboard_snapshot uniques differ from the data")
    if [sum(v[i] for v in snapshot.daily.values()) for i in range(30)] != want_days:
        problems.append("dashboard_snapshot daily counts differ from the data")
    if [sum(v[i] for v in snapshot.hourly.values()) for i in range(48)] != want_hours:
        problems.append("dashboard_snapshot hourly counts differ from the data")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 30 days of data, 1 round of 2 s per query")
    parser.add_argument("--days", type=int, help="days of data in PostgreSQL (default 365; --quick: 30)")
    parser.add_argument("--rounds", type=int, help="timing rounds per query (default 3; --quick: 1)")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a throwaway one")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
