"""Guarantee 4: queries are exact at any instant, at every point of a flush and under concurrency."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter, SidecarWriter, Writer, pg_counters

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.flusher.staging import ClaimHeld, Staging
from analytics_pipeline.flusher.store import apply_unit
from analytics_pipeline.reads.queries import ConsistencyError, Queries, QueryInputError

NOW = datetime.now(UTC)
TODAY = NOW.date()
YESTERDAY = TODAY - timedelta(days=1)


def at(day: date, hour: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, 30, tzinfo=UTC)


def day_total(expected: Counter, event: str | None, day: date) -> int:
    return sum(n for k, n in expected.items() if k[0] == "d" and k[2] == day and event in (None, k[1]))


def users_of(expected: Counter, event: str | None, day: date) -> set[str]:
    return {k[3] for k in expected if k[0] == "u" and k[2] == day and event in (None, k[1])}


async def check_all(q: Queries, writer: LuaWriter) -> None:
    """Every query type agrees with what the writer acknowledged."""
    exp = writer.expected
    for event in (None, "view", "click"):
        series = await q.counts(event, YESTERDAY, TODAY, "day")
        assert [p.count for p in series.points] == [day_total(exp, event, YESTERDAY), day_total(exp, event, TODAY)]
        hourly = await q.counts(event, at(YESTERDAY, 0), at(TODAY, 23), "hour")
        want = [sum(n for k, n in exp.items() if k[0] == "h" and k[2] == p.bucket and event in (None, k[1]))
                for p in hourly.points]
        assert [p.count for p in hourly.points] == want and hourly.total == series.total
        uniques = await q.uniques(event, YESTERDAY, TODAY)
        assert [p.count for p in uniques.points] == [len(users_of(exp, event, d)) for d in (YESTERDAY, TODAY)]
        assert uniques.distinct_total == len(users_of(exp, event, YESTERDAY) | users_of(exp, event, TODAY))
    mine = await q.counts(None, YESTERDAY, TODAY, "day", user_id="alice")
    assert mine.total == sum(n for k, n in exp.items() if k[0] == "u" and k[3] == "alice")
    clicks = await q.counts("click", TODAY, TODAY, "day", user_id="bob")
    assert clicks.total == exp["u", "click", TODAY, "bob"]
    totals = {e.event: e.count for e in await q.event_types()}
    assert totals == {e: day_total(exp, e, YESTERDAY) + day_total(exp, e, TODAY) for e in ("view", "click")}
    snap = await q.dashboard_snapshot(now=at(TODAY, 23), hours=48, days=2)
    assert snap.days == [YESTERDAY, TODAY]
    assert snap.totals == totals
    assert snap.uniques == [len(users_of(exp, None, d)) for d in (YESTERDAY, TODAY)]
    assert sum(sum(v) for v in snap.hourly.values()) == sum(totals.values())


async def write_mix(writer: LuaWriter) -> None:
    await writer.write([("view", "alice", at(YESTERDAY, 10)), ("view", "bob", at(YESTERDAY, 11)),
                        ("click", "alice", at(TODAY, 0)), ("view", None, at(TODAY, 0)),
                        ("view", "carol", at(TODAY, 1)), ("click", "bob", at(TODAY, 1))])


async def test_exact_at_every_point_of_a_flush(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                               config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    q = Queries(redis_client, pg, config.pipeline)
    staging = Staging(redis_client, keys)
    await write_mix(writer)
    await check_all(q, writer)  # live only
    claim = await staging.claim("run1-00001", 3)  # some buckets staged, the rest still live
    assert claim.staged_keys
    await check_all(q, writer)
    await write_mix(writer)  # fresh live buckets beside the staged ones
    await check_all(q, writer)
    assert (await apply_unit(pg, config.pipeline, "run1-00001", await staging.read_unit("run1-00001"))).applied
    await check_all(q, writer)  # committed, staging keys still there: not counted twice
    await staging.cleanup("run1-00001")
    await check_all(q, writer)
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    await check_all(q, writer)  # all in PostgreSQL
    await write_mix(writer)
    await check_all(q, writer)  # PostgreSQL + live: same users counted once in uniques
    assert q.retries == 0


async def test_claim_and_commit_between_the_two_reads_is_retried(redis_client: aioredis.Redis,
                                                                 pg: asyncpg.Connection, config: Config,
                                                                 writer: LuaWriter) -> None:
    """Spike case: Redis read, then a whole flush, then the PostgreSQL read. The seqlock must retry."""
    await write_mix(writer)

    async def flush_in_between(attempt: int) -> None:
        if attempt == 0:
            stats = await flush_pipeline(redis_client, pg, config, config.pipeline)
            assert stats.units == 1

    q = Queries(redis_client, pg, config.pipeline, after_snapshot=flush_in_between)
    series = await q.counts(None, YESTERDAY, TODAY, "day")
    assert series.total == 6  # not 12
    assert q.retries == 1


async def test_commit_and_cleanup_between_the_two_reads_needs_no_retry(redis_client: aioredis.Redis,
                                                                       pg: asyncpg.Connection, config: Config,
                                                                       writer: LuaWriter, keys: PipelineKeys) -> None:
    """Dip case: the snapshot saw the unit staged; it commits and is cleaned up before PostgreSQL is read."""
    await write_mix(writer)
    staging = Staging(redis_client, keys)
    await staging.claim("run2-00001", 1000)

    async def commit_in_between(attempt: int) -> None:
        if attempt == 0:
            await apply_unit(pg, config.pipeline, "run2-00001", await staging.read_unit("run2-00001"))
            await staging.cleanup("run2-00001")

    q = Queries(redis_client, pg, config.pipeline, after_snapshot=commit_in_between)
    uniques = await q.uniques(None, TODAY, TODAY)
    series = await q.counts(None, YESTERDAY, TODAY, "day")
    assert series.total == 6 and uniques.points[0].count == 3  # not 0
    assert q.retries == 0


async def test_reader_that_keeps_losing_parks_claims(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                     config: Config, writer: LuaWriter, keys: PipelineKeys) -> None:
    """After max_retries lost races the reader holds claims: a flusher waits, the reader finishes exactly."""
    staging = Staging(redis_client, keys)
    waiting_flush: list[asyncio.Task] = []
    seen_at_snapshot: list[int] = []
    other = await asyncpg.connect(config.database_url)

    async def race(attempt: int) -> None:
        seen_at_snapshot.append(day_total(writer.expected, None, TODAY))
        if attempt < 2:  # a claim between the reads: the reader loses this round
            await writer.write([("view", "zed", at(TODAY, 2))])
            assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).units == 1
        else:  # claims are held now
            await writer.write([("view", "zed", at(TODAY, 2))])
            with pytest.raises(ClaimHeld):
                await staging.claim("blocked-00001", 10)
            assert await redis_client.zcard(keys.inflight) == 0
            waiting_flush.append(asyncio.create_task(flush_pipeline(redis_client, other, config, config.pipeline)))
            await asyncio.sleep(0.05)
            assert not waiting_flush[0].done(), waiting_flush[0].result()  # the flusher waits for the hold

    try:
        await write_mix(writer)
        q = Queries(redis_client, pg, config.pipeline, max_retries=2, after_snapshot=race)
        series = await q.counts(None, TODAY, TODAY, "day")
        assert series.total == seen_at_snapshot[-1]  # exactly what was acked when the last snapshot was taken
        assert (q.retries, q.holds) == (2, 1)
        assert await redis_client.zcard(keys.claim_hold) == 0  # released at once, not left to expire
        stats = await asyncio.wait_for(waiting_flush[0], 10)
        assert stats.error is None and stats.units == 1
        plain = Queries(redis_client, pg, config.pipeline)
        assert (await plain.counts(None, TODAY, TODAY, "day")).total == day_total(writer.expected, None, TODAY)
    finally:
        await other.close()


async def test_gives_up_when_claims_race_even_while_held(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                         config: Config, keys: PipelineKeys) -> None:
    async def bump(attempt: int) -> None:
        await redis_client.incr(keys.claim_seq)  # what only a hold-ignoring claimer could do

    q = Queries(redis_client, pg, config.pipeline, max_retries=1, max_holds=1, after_snapshot=bump)
    with pytest.raises(ConsistencyError):
        await q.counts("x", TODAY, TODAY)


async def test_bad_parameters_name_the_parameter(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                 config: Config) -> None:
    q = Queries(redis_client, pg, config.pipeline)
    cases = [
        (q.counts("x", TODAY, YESTERDAY), "to"),
        (q.counts("x", TODAY, TODAY, "minute"), "granularity"),  # type: ignore[arg-type]
        (q.counts("x", TODAY, TODAY, "hour", user_id="u"), "granularity"),
        (q.counts("", TODAY, TODAY), "event"),
        (q.counts("x", TODAY - timedelta(days=20000), TODAY), "from"),
        (q.uniques("x", TODAY, TODAY - timedelta(days=1)), "to"),
    ]
    for coroutine, parameter in cases:
        with pytest.raises(QueryInputError) as error:
            await coroutine
        assert error.value.parameter == parameter


@pytest.fixture(params=["lua", "sidecar"])
async def any_writer(request: pytest.FixtureRequest, writer: LuaWriter, config: Config) -> AsyncIterator[Writer]:
    """The sidecar stand-in, or the real sidecar (create_app over HTTP; acked = 200)."""
    if request.param == "lua":
        yield writer
        return
    real = await SidecarWriter(config).start()
    try:
        yield real
    finally:
        await real.close()


async def test_queries_under_concurrent_writes_and_flushes(redis_url: str, redis_client: aioredis.Redis,
                                                           pg: asyncpg.Connection, config: Config,
                                                           any_writer: Writer) -> None:
    """Samples taken while writers write and flushers flush are never above what was sent, never below
    what was acked before the query started; final totals exact."""
    writer = any_writer
    sent: Counter[str] = Counter()  # incremented before a write is sent
    acked: Counter[str] = Counter()  # incremented after it returned
    users_sent: set[str] = set()
    users_acked: set[str] = set()
    day_start = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=UTC)
    span = max(int((NOW - day_start).total_seconds()), 1)
    done = asyncio.Event()
    samples = 0
    flushed = 0  # units committed so far by the flush loops

    async def write(seed: int) -> None:
        """250 writes, then more until the samplers and flushers did enough work to make the test
        meaningful: a loaded machine gets more writes rather than a failed count (300 s bounds a hang)."""
        rng = random.Random(seed)
        written, deadline = 0, time.monotonic() + 300
        while written < 250 or ((samples < 10 or flushed < 10) and time.monotonic() < deadline):
            written += 1
            events = [(f"e{rng.randrange(3)}", f"u{rng.randrange(50)}",
                       day_start + timedelta(seconds=rng.randrange(span))) for _ in range(rng.randrange(1, 6))]
            users = {e[1] for e in events}
            sent["all"] += len(events)
            sent["e1"] += sum(e[0] == "e1" for e in events)
            users_sent.update(users)
            await writer.write(events)
            acked["all"] += len(events)
            acked["e1"] += sum(e[0] == "e1" for e in events)
            users_acked.update(users)
            await asyncio.sleep(0.001)

    async def flush_loop() -> int:
        nonlocal flushed
        client = aioredis.Redis.from_url(redis_url)
        conn = await asyncpg.connect(config.database_url)
        units = 0
        try:
            while not done.is_set():
                stats = await flush_pipeline(client, conn, config, config.pipeline, batch_size=1, use_lock=False)
                assert stats.error is None, stats.error
                units += stats.units
                flushed += stats.units
        finally:
            await client.aclose()
            await conn.close()
        return units

    violations: list[str] = []

    async def widen_race_window(attempt: int) -> None:
        await asyncio.sleep(0.02)  # a slow hop between the Redis and the PostgreSQL read

    async def sample(slow: bool) -> None:
        nonlocal samples
        pool = await asyncpg.create_pool(config.database_url, min_size=1, max_size=2)
        q = Queries(redis_client, pool, config.pipeline, after_snapshot=widen_race_window if slow else None)
        try:
            while not done.is_set():
                low, low_e1, low_users = acked["all"], acked["e1"], len(users_acked)
                total = (await q.counts(None, TODAY, TODAY, "day")).total
                e1 = (await q.counts("e1", day_start, NOW, "hour")).total
                uniq = (await q.uniques(None, TODAY, TODAY)).points[0].count
                events = sum(e.count for e in await q.event_types(TODAY, TODAY))
                snap = await q.dashboard_snapshot(now=NOW, hours=24, days=1)
                high, high_e1, high_users = sent["all"], sent["e1"], len(users_sent)
                for name, value, lo, hi in [("total", total, low, high), ("e1", e1, low_e1, high_e1),
                                            ("uniques", uniq, low_users, high_users),
                                            ("events", events, low, high),
                                            ("snapshot", sum(snap.totals.values()), low, high),
                                            ("snapshot_uniques", snap.uniques[-1], low_users, high_users)]:
                    if not lo <= value <= hi:
                        violations.append(f"{name}: {value} not in [{lo}, {hi}]")
                samples += 1
            print(f"queries: {samples} samples, {q.retries} seqlock retries, {q.holds} holds")
        finally:
            await pool.close()

    flushers = [asyncio.create_task(flush_loop()) for _ in range(2)]
    samplers = [asyncio.create_task(sample(slow)) for slow in (False, True)]
    await asyncio.gather(*(write(seed) for seed in range(3)))
    done.set()
    flushed_units = sum(await asyncio.gather(*flushers))
    await asyncio.gather(*samplers)
    assert not violations, violations[:10]
    assert samples >= 10 and flushed_units >= 10
    q = Queries(redis_client, pg, config.pipeline)
    assert (await q.counts(None, TODAY, TODAY, "day")).total == sent["all"] == acked["all"]
    assert (await q.uniques(None, TODAY, TODAY)).points[0].count == len(users_acked)
    await flush_pipeline(redis_client, pg, config, config.pipeline)
    assert (await q.counts(None, TODAY, TODAY, "day")).total == acked["all"]
    assert (await q.counts("e1", TODAY, TODAY, "day")).total == acked["e1"]
    assert await pg_counters(pg, config.pipeline) == writer.expected  # every acked increment, exactly once


class _ActBeforeStagedRead:
    """A Redis client that runs ``action`` once just before the snapshot's second round trip (the read
    of the in-flight units' staging keys, the one non-transactional pipeline a query opens)."""

    def __init__(self, client: aioredis.Redis, action: Callable[[], Awaitable[None]]) -> None:
        self._client = client
        self._action: Callable[[], Awaitable[None]] | None = action
        self.acted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def pipeline(self, transaction: bool = True) -> Any:
        real = self._client.pipeline(transaction=transaction)
        if transaction or self._action is None:
            return real
        action, self._action = self._action, None
        outer = self

        class _Enter:
            async def __aenter__(self) -> Any:
                await action()
                outer.acted = True
                return await real.__aenter__()

            async def __aexit__(self, *exc: object) -> None:
                await real.__aexit__(*exc)

        return _Enter()


async def test_commit_and_cleanup_between_the_live_read_and_the_staged_read(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter,
        keys: PipelineKeys) -> None:
    """The snapshot's two round trips: a unit listed in flight by the first is committed and cleaned up
    before the second reads its (now deleted) staging keys. PostgreSQL, read after both, has it."""
    await write_mix(writer)
    staging = Staging(redis_client, keys)
    await staging.claim("run3-00001", 1000)

    async def commit_and_clean() -> None:
        await apply_unit(pg, config.pipeline, "run3-00001", await staging.read_unit("run3-00001"))
        await staging.cleanup("run3-00001")

    client = _ActBeforeStagedRead(redis_client, commit_and_clean)
    q = Queries(client, pg, config.pipeline)  # type: ignore[arg-type]
    series = await q.counts(None, YESTERDAY, TODAY, "day")
    assert client.acted and series.total == 6 and q.retries == 0  # not 0: counted from PostgreSQL
    await check_all(Queries(redis_client, pg, config.pipeline), writer)
    uniques = await Queries(redis_client, pg, config.pipeline).uniques(None, TODAY, TODAY)
    assert uniques.points[0].count == 3
