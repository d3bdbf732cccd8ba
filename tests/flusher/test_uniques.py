"""Daily uniques from the flusher-maintained rollups: exact across flush boundaries, with users partly in
PostgreSQL and partly in Redis, with units of one pipeline racing (lock off), after crashes, after
retention, and after migrating a database created with the old layout."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, assert_rollups_exact, delete_pipeline_rows, pg_counters, rollup_state
from support import flush_env, make_config, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import BucketRef, PipelineKeys, day_bucket, user_field
from analytics_pipeline.flusher.migrate import USER_DAILY_KEY, apply_schema
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.flusher.staging import StagedBucket, Staging
from analytics_pipeline.flusher.store import apply_unit, rebuild_rollups
from analytics_pipeline.reads.queries import Queries

NOW = datetime.now(UTC)
TODAY = NOW.date()
D1 = TODAY - timedelta(days=1)
D2 = TODAY - timedelta(days=2)
EVENTS = (None, "view", "click", "buy")


def at(day: date, hour: int = 12) -> datetime:
    moment = datetime(day.year, day.month, day.day, hour, 0, tzinfo=UTC)
    return min(moment, NOW)  # never in the future (today's noon may not have come yet)


def users_of(expected: Counter, event: str | None, days: Iterable[date]) -> set[str]:
    wanted = set(days)
    return {k[3] for k, n in expected.items() if k[0] == "u" and n and k[2] in wanted and event in (None, k[1])}


async def check_uniques(q: Queries, expected: Counter, first: date, last: date) -> None:
    """Per-day and whole-range uniques of every event filter equal the acknowledged events."""
    days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
    for event in EVENTS:
        got = await q.uniques(event, first, last)
        assert [p.count for p in got.points] == [len(users_of(expected, event, [d])) for d in days], (event, days)
        assert got.distinct_total == len(users_of(expected, event, days)), (event, days)
    snapshot = await q.dashboard_snapshot(now=NOW, hours=1, days=3)
    assert snapshot.uniques == [len(users_of(expected, None, [d])) for d in (D2, D1, TODAY)]
    assert snapshot.distinct_users == len(users_of(expected, None, (D2, D1, TODAY)))


async def check_all_ranges(q: Queries, expected: Counter) -> None:
    # [D2, TODAY] ends at the last day with data (the rollup path); [D2, D1] and [D1, D1] may not
    # (users seen today too: the exact distinct count over the per-user rows)
    for first, last in ((D2, TODAY), (D2, D1), (D1, D1), (TODAY, TODAY)):
        await check_uniques(q, expected, first, last)
    mine = await q.counts(None, D2, TODAY, "day", user_id="alice")
    assert [p.count for p in mine.points] == [sum(n for k, n in expected.items() if k[0] == "u" and k[3] == "alice"
                                                  and k[2] == d) for d in (D2, D1, TODAY)]
    views = await q.counts("view", D2, TODAY, "day", user_id="alice")
    assert views.total == sum(n for k, n in expected.items() if k[:2] == ("u", "view") and k[3] == "alice")


async def test_uniques_exact_across_flush_boundaries(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                     config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    """The same user on the same day arrives in several units and runs, with several event types: counted
    once per day and once per (day, event); users partly flushed, partly live or staged in Redis."""
    q = Queries(redis_client, pg, config.pipeline)
    await writer.write([("view", "alice", at(D2, 9)), ("click", "alice", at(D2, 10)), ("view", "bob", at(D2, 11)),
                        ("view", "alice", at(D1))])
    await check_all_ranges(q, writer.expected)  # Redis only
    assert (await flush_pipeline(redis_client, pg, config, config.pipeline, batch_size=1)).units > 1
    await assert_rollups_exact(pg, config.pipeline)
    await check_all_ranges(q, writer.expected)  # PostgreSQL only

    # run 2: a known row again, a new event type of a known (day, user), a new user, a user of today
    await writer.write([("view", "alice", at(D2, 13)), ("buy", "alice", at(D2, 14)), ("view", "carol", at(D2, 15)),
                        ("click", "dave", at(TODAY, 0))])
    await check_all_ranges(q, writer.expected)  # alice and bob in both stores: once
    assert (await flush_pipeline(redis_client, pg, config, config.pipeline, batch_size=2)).error is None
    await assert_rollups_exact(pg, config.pipeline)
    await check_all_ranges(q, writer.expected)
    state = await rollup_state(pg, config.pipeline)
    assert state["users"][("", D2)] == 3 and state["users"][("view", D2)] == 3  # alice, bob, carol
    assert state["users"][("click", D2)] == 1 and state["users"][("buy", D2)] == 1
    assert state["last_day"][("", "alice")] == D1.toordinal() and state["last_day"][("view", "alice")] == D1.toordinal()

    # run 3 half done: one unit staged (claimed, not applied), more live writes beside it
    await writer.write([("view", "alice", at(TODAY, 0)), ("click", "bob", at(TODAY, 0)), ("view", "erin", at(D1))])
    staging = Staging(redis_client, keys)
    assert (await staging.claim("half-00001", 2)).staged_keys
    await writer.write([("buy", "dave", at(TODAY, 0)), ("view", "frank", at(D2, 16)), ("click", "alice", at(D1))])
    await check_all_ranges(q, writer.expected)
    assert (await apply_unit(pg, config.pipeline, "half-00001", await staging.read_unit("half-00001"))).applied
    await check_all_ranges(q, writer.expected)  # committed, staged copy still in Redis: not counted twice
    await staging.cleanup("half-00001")
    assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).error is None
    await assert_rollups_exact(pg, config.pipeline)
    await check_all_ranges(q, writer.expected)
    assert await pg_counters(pg, config.pipeline) == writer.expected


async def test_units_of_one_pipeline_apply_one_at_a_time(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                         config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    """Two flushers (no Redis lock) apply units holding the same new user at the same moment: the second
    waits for the first's commit (pipeline advisory lock) and does not count the user again."""
    staging = Staging(redis_client, keys)
    await writer.write([("view", "zed", at(TODAY, 0)), ("view", "amy", at(D1))])
    await staging.claim("race-a-00001", 100)
    await writer.write([("click", "zed", at(TODAY, 0)), ("view", "amy", at(D1)), ("view", "bo", at(TODAY, 0))])
    await staging.claim("race-b-00001", 100)
    first_inside = asyncio.Event()
    release_first = asyncio.Event()

    async def hold() -> None:
        first_inside.set()
        await release_first.wait()

    other = await asyncpg.connect(config.database_url)
    monitor = await asyncpg.connect(config.database_url)
    try:
        first = asyncio.create_task(apply_unit(pg, config.pipeline, "race-a-00001",
                                               await staging.read_unit("race-a-00001"), in_transaction=hold))
        await asyncio.wait_for(first_inside.wait(), 10)
        second = asyncio.create_task(apply_unit(other, config.pipeline, "race-b-00001",
                                                await staging.read_unit("race-b-00001")))
        waiting = 0
        for _ in range(100):  # the second transaction queues on the pipeline's advisory lock
            waiting = await monitor.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' "
                                        "AND NOT granted", other.get_server_pid())
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting == 1 and not second.done()
        release_first.set()
        results = await asyncio.wait_for(asyncio.gather(first, second), 20)
        assert all(result.applied for result in results)
    finally:
        release_first.set()
        await other.close()
        await monitor.close()
    state = await rollup_state(pg, config.pipeline)
    assert state["users"][("", TODAY)] == 2  # zed once (not once per unit), bo
    assert (state["users"][("view", TODAY)], state["users"][("click", TODAY)]) == (2, 1)
    assert state["users"][("", D1)] == 1 and state["last_seen_users"][("", TODAY)] == 2
    await assert_rollups_exact(pg, config.pipeline)
    assert await pg_counters(pg, config.pipeline) == writer.expected


async def test_two_flush_processes_without_lock_keep_rollups_exact(redis_client: aioredis.Redis,
                                                                   pg: asyncpg.Connection, config: Config,
                                                                   writer: LuaWriter, keys: PipelineKeys) -> None:
    """Two real ``flush --no-lock`` processes over many one-bucket units of overlapping users."""
    for n in range(12):
        await writer.write([(f"e{(n + i) % 3}", f"u{(n * 7 + i) % 9}", NOW - timedelta(days=i % 3, minutes=n))
                            for i in range(15)])
    env = flush_env(config)
    results = await asyncio.gather(*(run_cli_async(["flush", "--no-lock", "--batch-size", "1"], env)
                                     for _ in range(2)))
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out.splitlines()[-1])["ok"]
    assert sum(json.loads(out.splitlines()[-1])["units"] for _, out, _ in results) >= 2
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    await check_uniques(Queries(redis_client, pg, config.pipeline), writer.expected, D2, TODAY)


@pytest.mark.parametrize("fault", ["in_transaction", "after_commit"])
async def test_crash_then_recovery_adds_rollups_once(fault: str, redis_client: aioredis.Redis,
                                                     pg: asyncpg.Connection, config: Config, writer: LuaWriter,
                                                     keys: PipelineKeys) -> None:
    """Killed before COMMIT (rolled back) or after it (the ledger skips the re-apply): rollups added once."""
    await writer.write([("view", f"u{i % 5}", NOW - timedelta(days=i % 2)) for i in range(20)])
    await flush_pipeline(redis_client, pg, config, config.pipeline)  # some users already known
    await writer.write([("click", f"u{i % 8}", NOW - timedelta(days=i % 3)) for i in range(30)])
    code, _, err = await run_cli_async(["flush", "--no-lock"], flush_env(config, ANALYTICS_FLUSH_FAULT=fault))
    assert code == -signal.SIGKILL, err
    assert await redis_client.zcard(keys.inflight) == 1
    code, out, err = await run_cli_async(["flush", "--no-lock"], flush_env(config))
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["recovered_units"] == 1
    assert summary["pipelines"][config.pipeline]["skipped_units"] == (1 if fault == "after_commit" else 0)
    assert await pg_counters(pg, config.pipeline) == writer.expected
    await assert_rollups_exact(pg, config.pipeline)
    await check_uniques(Queries(redis_client, pg, config.pipeline), writer.expected, D2, TODAY)


async def test_retention_removes_old_rollup_rows(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                 config: Config, pipeline: str) -> None:
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=5)
    long_ttl = {"ttl_seconds": 90 * 86400}
    keep = make_config(pipeline, config.redis_url, config.database_url, flush={"retention_days": 400},
                       counters=long_ttl)
    short = make_config(pipeline, config.redis_url, config.database_url, flush={"retention_days": 30},
                        counters=long_ttl)
    writer = LuaWriter(redis_client, keep)
    await writer.write([("view", "gone", old), ("view", "both", old), ("click", "both", recent),
                        ("view", "new", recent)])
    await redis_client.srem("ap:pipelines", pipeline)  # flushed by name below
    assert (await flush_pipeline(redis_client, pg, keep, pipeline)).retention_deleted_rows == 0
    before = await rollup_state(pg, pipeline)
    assert before["users"][("", old.date())] == 2 and ("", "gone") in before["last_day"]
    assert before["last_seen_users"][("view", old.date())] == 2  # gone and both saw "view" last on the old day
    stats = await flush_pipeline(redis_client, pg, short, pipeline)
    assert stats.error is None and stats.retention_deleted_rows == 2 + 1 + 1  # per-user, daily, hourly rows
    after = await rollup_state(pg, pipeline)
    assert not [key for key in after["users"] if key[1] == old.date()]
    assert not [key for key in after["last_seen_users"] if key[1] == old.date()]
    assert ("", "gone") not in after["last_day"] and ("view", "gone") not in after["last_day"]
    assert after["last_day"][("", "both")] == recent.date().toordinal()
    assert ("view", "both") not in after["last_day"]  # both's only "view" was on the old day
    await assert_rollups_exact(pg, pipeline)
    q = Queries(redis_client, pg, pipeline)
    uniques = await q.uniques(None, old.date(), TODAY)
    assert uniques.points[0].count == 0 and uniques.distinct_total == 2  # both, new
    assert (await q.uniques("view", old.date(), TODAY)).distinct_total == 1  # new


async def test_a_bucket_staged_twice_in_one_unit_is_summed_once(pg: asyncpg.Connection, config: Config) -> None:
    ref = BucketRef("u", day_bucket(TODAY))
    counts = {user_field("view", "ann"): 2, user_field("click", "ann"): 1, user_field("view", "ben"): 1}
    result = await apply_unit(pg, config.pipeline, "dup-00001", [StagedBucket(ref, counts), StagedBucket(ref, counts)])
    assert result.applied and result.rows == 3
    assert await pg_counters(pg, config.pipeline) == {("u", "view", TODAY, "ann"): 4, ("u", "click", TODAY, "ann"): 2,
                                                      ("u", "view", TODAY, "ben"): 2}
    await assert_rollups_exact(pg, config.pipeline)
    assert (await rollup_state(pg, config.pipeline))["users"][("", TODAY)] == 2


# The schema as it was before the rollups (kept verbatim: what existing databases hold).
OLD_SCHEMA = """
CREATE TABLE analytics_daily (pipeline text NOT NULL, event_type text NOT NULL, day date NOT NULL,
    count bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, event_type, day));
CREATE INDEX analytics_daily_pipeline_day ON analytics_daily (pipeline, day) INCLUDE (event_type, count);
CREATE TABLE analytics_hourly (pipeline text NOT NULL, event_type text NOT NULL, hour timestamptz NOT NULL,
    count bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, event_type, hour));
CREATE INDEX analytics_hourly_pipeline_hour ON analytics_hourly (pipeline, hour) INCLUDE (event_type, count);
CREATE TABLE analytics_user_daily (
    pipeline    text        NOT NULL,
    user_id     text        NOT NULL,
    event_type  text        NOT NULL,
    day         date        NOT NULL,
    count       bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, user_id, event_type, day)
);
CREATE INDEX analytics_user_daily_pipeline_day ON analytics_user_daily (pipeline, day, event_type, user_id);
CREATE TABLE analytics_flush_ledger (pipeline text NOT NULL, unit_id text NOT NULL, run_id text NOT NULL,
    batch integer NOT NULL, buckets integer NOT NULL, rows integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, unit_id));
CREATE INDEX analytics_flush_ledger_pipeline_applied ON analytics_flush_ledger (pipeline, applied_at);
"""


async def test_migrate_upgrades_an_old_layout_and_backfills(schema: str) -> None:
    """An old database: re-keyed day-major, retired index dropped, rollups created and back-filled from the
    existing rows (then maintained by the flusher on top); a second migrate is a no-op."""
    namespace = f"ap_upgrade_{uuid.uuid4().hex[:10]}"
    pipelines = [f"test/upgrade-{uuid.uuid4().hex[:8]}", f"test/upgrade-{uuid.uuid4().hex[:8]}"]
    admin = await asyncpg.connect(schema)
    await admin.execute(f"CREATE SCHEMA {namespace}")
    conn = await asyncpg.connect(schema, server_settings={"search_path": namespace, "timezone": "UTC"})
    try:
        await conn.execute(OLD_SCHEMA)
        rows = [(p, f"u{u}", f"e{(u + d) % 3}", D2 + timedelta(days=d), 1 + u)
                for p in pipelines for d in range(3) for u in range(d, 6 + d)]
        rows += [(pipelines[0], "u1", "e9", D2, 5)]  # a second event type for one user on one day
        await conn.executemany("INSERT INTO analytics_user_daily (pipeline, user_id, event_type, day, count) "
                               "VALUES ($1, $2, $3, $4, $5)", rows)
        changes = await apply_schema(conn)
        assert ("table", "analytics_daily_uniques") in changes and ("table", "analytics_user_last_seen") in changes
        assert ("dropped index", "analytics_user_daily_pipeline_day") in changes
        assert [kind for kind, _ in changes].count("primary key") == 1
        key = await conn.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'p' "
                                  "AND conrelid = 'analytics_user_daily'::regclass")
        assert key == f"PRIMARY KEY ({', '.join(USER_DAILY_KEY)})"
        indexes = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1 "
                                   "AND tablename = 'analytics_user_daily'", namespace)
        assert [row["indexname"] for row in indexes] == ["analytics_user_daily_pkey"]
        for pipeline in pipelines:
            await assert_rollups_exact(conn, pipeline)
        state = await rollup_state(conn, pipelines[0])
        assert state["users"][("", D2)] == 6 and state["users"][("e9", D2)] == 1
        assert sum(n for (event, _), n in state["last_seen_users"].items() if event == "") == 8  # u0..u7
        assert await apply_schema(conn) == []  # up to date: nothing re-run

        # the flusher keeps the back-filled rollups exact from there on
        ref = BucketRef("u", day_bucket(D1))
        unit = [StagedBucket(ref, {user_field("e1", "u1"): 1, user_field("e7", "u5"): 2, user_field("e0", "new"): 1})]
        assert (await apply_unit(conn, pipelines[0], "upgrade-00001", unit)).applied
        await assert_rollups_exact(conn, pipelines[0])

        # an old schema.sql run again (e.g. by an older release) re-creates the retired index: noticed
        await conn.execute("CREATE INDEX analytics_user_daily_pipeline_day "
                           "ON analytics_user_daily (pipeline, day, event_type, user_id)")
        assert await apply_schema(conn) == [("dropped index", "analytics_user_daily_pipeline_day")]
        assert await apply_schema(conn) == []
    finally:
        await conn.close()
        await admin.execute(f"DROP SCHEMA {namespace} CASCADE")  # our own throwaway schema only
        await admin.close()


async def test_rollup_rows_are_deleted_with_the_pipeline(pg: asyncpg.Connection, config: Config) -> None:
    """delete_pipeline_rows (flusher.store.PIPELINE_TABLES) leaves nothing of a pipeline behind."""
    unit = [StagedBucket(BucketRef("u", day_bucket(TODAY)), {user_field("view", "ann"): 1})]
    await apply_unit(pg, config.pipeline, "gone-00001", unit)
    await delete_pipeline_rows(pg, config.pipeline)
    state = await rollup_state(pg, config.pipeline)
    assert state == {"users": {}, "last_seen_users": {}, "last_day": {}}


async def test_rebuild_recomputes_one_pipelines_rollups(pg: asyncpg.Connection, config: Config) -> None:
    """Rows written behind the flusher's back make the rollups stale; rebuild_rollups makes them exact again."""
    unit = [StagedBucket(BucketRef("u", day_bucket(D1)), {user_field("view", "ann"): 1, user_field("buy", "bo"): 1})]
    await apply_unit(pg, config.pipeline, "rebuild-00001", unit)
    await pg.executemany("INSERT INTO analytics_user_daily (pipeline, user_id, event_type, day, count) "
                         "VALUES ($1, $2, $3, $4, 1)", [(config.pipeline, "cy", "view", TODAY),
                                                        (config.pipeline, "ann", "click", D2)])
    with pytest.raises(AssertionError):
        await assert_rollups_exact(pg, config.pipeline)
    await rebuild_rollups(pg, config.pipeline)
    await assert_rollups_exact(pg, config.pipeline)
    assert (await rollup_state(pg, config.pipeline))["users"][("", TODAY)] == 1


async def test_redis_user_seen_later_for_another_event(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                       config: Config, writer: LuaWriter) -> None:
    """A Redis (day, user) whose last day in PostgreSQL is later: held that day for one event, not another."""
    await writer.write([("view", "kim", at(D2)), ("click", "kim", at(D1)), ("buy", "lee", at(TODAY, 0))])
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    await writer.write([("click", "kim", at(D2)), ("view", "kim", at(D2)), ("buy", "lee", at(D1))])
    q = Queries(redis_client, pg, config.pipeline)
    assert [p.count for p in (await q.uniques("click", D2, D2)).points] == [1]  # new for "click" on D2
    assert [p.count for p in (await q.uniques(None, D2, D2)).points] == [1]  # kim: already counted on D2
    for first, last in ((D2, TODAY), (D2, D1), (D2, D2), (D1, D1)):
        await check_uniques(q, writer.expected, first, last)


async def test_migrate_command_rebuilds_rollups(pg: asyncpg.Connection, config: Config) -> None:
    await pg.execute("INSERT INTO analytics_user_daily (pipeline, user_id, event_type, day, count) "
                     "VALUES ($1, 'hand', 'view', $2, 1)", config.pipeline, TODAY)  # behind the flusher's back
    code, out, err = await run_cli_async(["migrate", "--rebuild-rollups", config.pipeline], flush_env(config))
    assert code == 0, err
    assert f"rebuilt rollups of {config.pipeline}" in out.splitlines()
    await assert_rollups_exact(pg, config.pipeline)
    assert (await rollup_state(pg, config.pipeline))["users"] == {("", TODAY): 1, ("view", TODAY): 1}
    code, _, err = await run_cli_async(["migrate", "--rebuild-rollups", "not a pipeline"], flush_env(config))
    assert code == 2 and "--rebuild-rollups" in err
