"""Reads never block writes (issue 11, case 4): no query does work proportional to a bucket's users in
one Redis call, and the results stay exact when claims, commits and writes land between the pieces.

The assertions are structural, never on time: every command the query path sends is recorded on the
wire (a redis-py connection class that logs what it packs), and no per-user bucket is read whole
(HGETALL/HKEYS/HVALS), every HSCAN carries a bounded COUNT, a user's counts are HGET/HMGET only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from flushkit import LuaWriter
from redis.asyncio.connection import Connection, ConnectionPool

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys, user_field
from analytics_pipeline.flusher.run import flush_pipeline
from analytics_pipeline.flusher.staging import Staging
from analytics_pipeline.flusher.store import apply_unit
from analytics_pipeline.reads.queries import Queries

NOW = datetime.now(UTC)
TODAY = NOW.date()
YESTERDAY = TODAY - timedelta(days=1)
BIG = 300_000
SCAN_COUNT = 1000
WHOLE_HASH_READS = {"HGETALL", "HKEYS", "HVALS", "HLEN", "HSTRLEN", "DUMP", "SORT"}

Command = tuple[str, ...]


def _words(args: Iterable[Any]) -> Command:
    return tuple(a.decode(errors="replace") if isinstance(a, bytes | memoryview) else str(a)
                 for a in (bytes(x) if isinstance(x, memoryview) else x for x in args))


def recording_client(url: str, log: list[list[Command]]) -> aioredis.Redis:
    """A decoded client that appends every round trip it sends to ``log`` (a list of commands each)."""

    class Recording(Connection):
        _grouped = False

        def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
            commands = [tuple(command) for command in commands]
            log.append([_words(command) for command in commands])
            self._grouped = True
            try:
                return super().pack_commands(commands)
            finally:
                self._grouped = False

        def pack_command(self, *args: Any) -> list[bytes]:
            if not self._grouped:
                log.append([_words(args)])
            return super().pack_command(*args)

    pool = ConnectionPool.from_url(url, connection_class=Recording, decode_responses=True)
    return aioredis.Redis(connection_pool=pool)


def user_bucket_commands(log: list[list[Command]], keys: PipelineKeys) -> list[Command]:
    """Every recorded command on a per-user bucket of the pipeline, live (``u:``) or staged (``s:*:u:``)."""
    out = []
    for trip in log:
        for command in trip:
            if len(command) > 1 and command[1].startswith(keys.base) and (
                    command[1].startswith(keys.base + "u:") or ":u:" in command[1][len(keys.base):]):
                out.append(command)
    return out


def assert_bounded(commands: list[Command], allowed: set[str]) -> None:
    """Only ``allowed`` commands; no whole-hash read; each HSCAN/HMGET bounded by SCAN_COUNT."""
    assert commands
    names = {command[0].upper() for command in commands}
    assert names <= allowed, names
    assert not names & WHOLE_HASH_READS, names
    for command in commands:
        if command[0].upper() == "HSCAN":
            words = [word.upper() for word in command]
            assert "COUNT" in words, command
            assert int(command[words.index("COUNT") + 1]) <= SCAN_COUNT, command
        if command[0].upper() == "HMGET":
            assert len(command) - 2 <= SCAN_COUNT, command


async def fill_user_bucket(client: aioredis.Redis, key: str, users: range, event: str = "view") -> None:
    """``len(users)`` per-user counters (1 each) in one bucket, 10,000 fields per HSET, in one pipeline."""
    async with client.pipeline(transaction=False) as pipe:
        for start in range(users.start, users.stop, 10_000):
            pipe.hset(key, mapping={user_field(event, f"u{n:06d}"): 1 for n in range(start, min(start + 10_000,
                                                                                              users.stop))})
        pipe.expire(key, 86400)
        await pipe.execute()


@pytest.fixture
async def recorded(redis_url: str, keys: PipelineKeys,
                   redis_client: aioredis.Redis) -> AsyncIterator[tuple[aioredis.Redis, list[list[Command]]]]:
    """A recording client; the big keys are UNLINKed afterwards (before redis_client's DEL: shared Redis)."""
    log: list[list[Command]] = []
    client = recording_client(redis_url, log)
    try:
        yield client, log
    finally:
        big = [key async for key in client.scan_iter(match=keys.scan_pattern, count=1000)]
        if big:
            await client.unlink(*big)  # in Redis's background thread: the Redis is shared
        await client.aclose()


async def test_300k_user_bucket_is_never_read_whole(recorded: tuple[aioredis.Redis, list[list[Command]]],
                                                     pg: asyncpg.Connection, config: Config, writer: LuaWriter,
                                                     keys: PipelineKeys) -> None:
    client, log = recorded
    await writer.write([("view", "alice", NOW), ("click", "alice", NOW), ("click", "bob", NOW)])
    await fill_user_bucket(client, keys.user_daily(TODAY), range(BIG))
    # half of the big bucket is in flight: claimed by a unit that has not committed
    staging = Staging(client, keys)
    assert (await staging.claim("run-big-00001", 1000)).staged_keys
    await writer.write([("view", "carol", NOW), ("click", "alice", NOW)])  # fresh live buckets beside it
    await fill_user_bucket(client, keys.user_daily(TODAY), range(BIG, BIG + 5000))
    q = Queries.for_config(client, pg, config.replace(queries={"scan_count": SCAN_COUNT}))

    log.clear()
    uniques = await q.uniques(None, YESTERDAY, TODAY)
    assert [p.count for p in uniques.points] == [0, BIG + 5000 + 3]
    assert uniques.distinct_total == BIG + 5000 + 3
    assert (await q.uniques("click", TODAY, TODAY)).points[0].count == 2
    commands = user_bucket_commands(log, keys)
    assert_bounded(commands, {"HSCAN"})
    assert sum(command[0].upper() == "HSCAN" for command in commands) >= BIG // SCAN_COUNT  # really in pieces
    assert max(len(trip) for trip in log) <= 1000 + 2  # no round trip carries more than a MULTI chunk

    log.clear()
    mine = await q.counts(None, YESTERDAY, TODAY, "day", user_id="alice")
    assert mine.total == 3
    assert (await q.counts("view", TODAY, TODAY, "day", user_id="u123456")).total == 1
    assert (await q.counts(None, TODAY, TODAY, "day", user_id="u300001")).total == 1
    assert_bounded(user_bucket_commands(log, keys), {"HMGET", "HGET"})

    log.clear()
    snapshot = await q.dashboard_snapshot(now=NOW, hours=2, days=2)
    assert snapshot.uniques == [0, BIG + 5000 + 3] and snapshot.distinct_users == BIG + 5000 + 3
    assert_bounded(user_bucket_commands(log, keys), {"HSCAN"})
    assert q.retries == 0


async def test_user_counts_without_daily_buckets_scan_in_pieces(
        recorded: tuple[aioredis.Redis, list[list[Command]]], pg: asyncpg.Connection, config: Config,
        keys: PipelineKeys) -> None:
    """With the daily granularity off no event types are known: the user's fields are found with
    HSCAN MATCH, still in bounded pieces, and still exact."""
    client, log = recorded
    config = config.replace(counters={"granularities": ["hourly", "user_daily"]},
                            queries={"scan_count": SCAN_COUNT})
    writer = LuaWriter(client, config)
    await writer.write([("view", "a*[x]?", NOW), ("click", "a*[x]?", NOW), ("view", "ab", NOW)])
    await fill_user_bucket(client, keys.user_daily(TODAY), range(20_000))
    q = Queries.for_config(client, pg, config)
    log.clear()
    assert (await q.counts(None, TODAY, TODAY, "day", user_id="a*[x]?")).total == 2  # glob characters are literal
    assert (await q.counts(None, TODAY, TODAY, "day", user_id="u000042")).total == 1
    assert_bounded(user_bucket_commands(log, keys), {"HSCAN"})


class _ActBetweenPieces:
    """A Redis client whose pipelines run ``action`` once, just before the ``nth`` round trip that
    carries a ``command`` (e.g. between the first and the second HSCAN piece of a query)."""

    def __init__(self, client: aioredis.Redis, command: str, nth: int, action: Callable[[], Awaitable[None]]) -> None:
        self._client = client
        self._command = command
        self._left = nth
        self._action: Callable[[], Awaitable[None]] | None = action
        self.acted = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def pipeline(self, transaction: bool = True) -> Any:
        return _Pipeline(self, self._client.pipeline(transaction=transaction))

    async def maybe_act(self, stack: list[Any]) -> None:
        if self._action is None or not any(str(args[0]).upper() == self._command for args, _ in stack):
            return
        self._left -= 1
        if self._left == 0:
            action, self._action = self._action, None
            await action()
            self.acted = True


class _Pipeline:
    def __init__(self, owner: _ActBetweenPieces, real: Any) -> None:
        self._owner = owner
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    async def __aenter__(self) -> _Pipeline:
        await self._real.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._real.__aexit__(*exc)

    async def execute(self) -> Any:
        await self._owner.maybe_act(self._real.command_stack)
        return await self._real.execute()


USERS = 5000
PIECE = 100


async def test_claim_and_commit_between_hscan_pieces_is_retried(redis_client: aioredis.Redis, pg: asyncpg.Connection,
                                                               config: Config, keys: PipelineKeys) -> None:
    """A whole flush (claim, commit, cleanup) between two HSCAN pieces of a live bucket: the piece after
    it reads an empty bucket, PostgreSQL then holds the users; the seqlock sees the claim and retries."""
    await fill_user_bucket(redis_client, keys.user_daily(TODAY), range(USERS))
    await redis_client.zadd(keys.dirty, {keys.user_daily(TODAY): 1})

    async def flush() -> None:
        assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).units == 1

    client = _ActBetweenPieces(redis_client, "HSCAN", 2, flush)
    q = Queries(client, pg, config.pipeline, scan_count=PIECE)  # type: ignore[arg-type]
    uniques = await q.uniques(None, TODAY, TODAY)
    assert client.acted and q.retries == 1
    assert uniques.points[0].count == uniques.distinct_total == USERS


async def test_commit_and_cleanup_between_pieces_of_a_staged_bucket(redis_client: aioredis.Redis,
                                                                    pg: asyncpg.Connection, config: Config,
                                                                    keys: PipelineKeys) -> None:
    """A unit the query listed in flight commits and is cleaned up while its staged bucket is being
    scanned (half read, then gone): PostgreSQL, read after the scan, has it; no retry is needed."""
    await fill_user_bucket(redis_client, keys.user_daily(TODAY), range(USERS))
    await redis_client.zadd(keys.dirty, {keys.user_daily(TODAY): 1})
    staging = Staging(redis_client, keys)
    await staging.claim("run-scan-00001", 10)
    await fill_user_bucket(redis_client, keys.user_daily(TODAY), range(USERS - 50, USERS + 50))  # live again

    async def commit_and_clean() -> None:
        assert (await apply_unit(pg, config.pipeline, "run-scan-00001",
                                 await staging.read_unit("run-scan-00001"))).applied
        await staging.cleanup("run-scan-00001")

    client = _ActBetweenPieces(redis_client, "HSCAN", 2, commit_and_clean)
    q = Queries(client, pg, config.pipeline, scan_count=PIECE)  # type: ignore[arg-type]
    uniques = await q.uniques(None, TODAY, TODAY)
    assert client.acted and q.retries == 0
    assert uniques.points[0].count == uniques.distinct_total == USERS + 50


async def test_writes_between_pieces_stay_within_what_was_acked_and_sent(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, keys: PipelineKeys,
        writer: LuaWriter) -> None:
    await fill_user_bucket(redis_client, keys.user_daily(TODAY), range(USERS))
    new_users = [f"new{n}" for n in range(300)]

    async def write() -> None:
        await writer.write([("view", user, NOW) for user in new_users])

    client = _ActBetweenPieces(redis_client, "HSCAN", 3, write)
    q = Queries(client, pg, config.pipeline, scan_count=PIECE)  # type: ignore[arg-type]
    count = (await q.uniques(None, TODAY, TODAY)).points[0].count
    assert client.acted and USERS <= count <= USERS + len(new_users)
    assert (await Queries(redis_client, pg, config.pipeline).uniques(None, TODAY, TODAY)).points[0].count == \
        USERS + len(new_users)


async def test_claim_between_event_types_and_user_lookup_is_retried(redis_client: aioredis.Redis,
                                                                    pg: asyncpg.Connection, config: Config,
                                                                    writer: LuaWriter) -> None:
    """A user's counts: a flush between reading the event types and the HMGET of the user's fields moves
    them to PostgreSQL; the seqlock retries and the count is exact (not 0)."""
    await writer.write([("view", "alice", NOW), ("click", "alice", NOW), ("buy", "bob", NOW)])

    async def flush() -> None:
        assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).units == 1

    client = _ActBetweenPieces(redis_client, "HMGET", 1, flush)
    q = Queries(client, pg, config.pipeline)  # type: ignore[arg-type]
    series = await q.counts(None, TODAY, TODAY, "day", user_id="alice")
    assert client.acted and q.retries == 1 and series.total == 2


async def test_event_types_only_in_postgres_still_find_the_users_live_fields(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter,
        keys: PipelineKeys) -> None:
    """The daily bucket flushed alone (its per-user bucket still live): the event type is known from the
    committed daily rows, so the user's live count is found."""
    await writer.write([("signup", "dora", NOW)])
    await redis_client.zrem(keys.dirty, keys.user_daily(TODAY), keys.hourly(NOW))  # only the daily bucket
    assert (await flush_pipeline(redis_client, pg, config, config.pipeline)).units == 1
    assert await redis_client.exists(keys.user_daily(TODAY)) and not await redis_client.exists(keys.daily(TODAY))
    q = Queries(redis_client, pg, config.pipeline)
    assert (await q.counts(None, TODAY, TODAY, "day", user_id="dora")).total == 1


async def test_user_ids_holding_the_separator_are_still_one_user_each(
        redis_client: aioredis.Redis, pg: asyncpg.Connection, config: Config, writer: LuaWriter) -> None:
    """Redis users go to PostgreSQL joined by US; an id holding US (the sidecar refuses it, another writer
    might not) must not be split into two users."""
    await writer.write([("view", "x\x1fy", NOW), ("view", "plain", NOW), ("click", "x\x1fy", NOW)])
    uniques = await Queries(redis_client, pg, config.pipeline).uniques(None, TODAY, TODAY)
    assert uniques.points[0].count == uniques.distinct_total == 2
