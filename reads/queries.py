"""THE query module: counts, daily uniques and event types that are exact at any instant.

A number is PostgreSQL's total + the live Redis buckets + the staged buckets of flush units that have
not committed yet. Reading two stores is racy: a claim+commit between the Redis read and the
PostgreSQL read would count a unit twice (spike), a commit+cleanup the other way round would lose it
(dip). So every query is a seqlock on the pipeline's ``claim_seq``:

1. Redis is read without any call that walks a whole per-user bucket (reads never block writes):
   one MULTI/EXEC reads ``claim_seq``, the in-flight units and the small live hashes; then, outside
   any transaction, the units' staged copies, a user's fields by HMGET and the users of per-user
   buckets by HSCAN in bounded pieces (as good as atomic: see ``Queries._snapshot``);
2. one REPEATABLE READ transaction reads the totals and which of those units the ledger already has
   (a unit in the ledger is in the totals, so its staged copy is skipped; otherwise it is added);
3. ``claim_seq`` is read again: if a claim happened in between (its buckets moved out of the live
   snapshot into a unit the snapshot did not see), the query is retried. After a few lost races the
   reader parks claims for a moment in ``claim_hold`` (the claim script refuses while it is set, the
   flusher waits) so it is guaranteed to finish.

Commits and cleanups need no seqlock: a unit's staging keys are deleted only after its ledger row is
committed, and step 2 sees the ledger and the totals in one snapshot. See docs/queries.md.

A sharded pipeline (``counters.shards``, core/shards.py) is read the same way over ALL its shards at
once: step 1 is done for every shard (each with its own ``claim_seq`` and in-flight units), step 2
checks the ledger for the in-flight units of every shard (unit ids are unique across shards), step 3
checks every shard's ``claim_seq``, and holds park the claims of every shard. Each shard's part is then
exact for a moment inside the query (no claim on that shard from its first read to its check), so the
sum is exact too: it holds every count acknowledged before the query began and none twice.

Distinct users come from the rollups the flusher keeps in the same transactions as the per-user rows
(``analytics_daily_uniques``, ``analytics_user_last_seen``, see schema.sql): a day's count is one row,
a range's count a sum over one row per day, and each Redis user is looked up once by key. Only a range
that ends before the last day with data needs a distinct count over the per-user rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, TypeVar

import asyncpg
import redis.asyncio as aioredis

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import (
    USER_FIELD_SEPARATOR,
    BucketKind,
    PipelineKeys,
    day_bucket,
    days_between,
    hour_bucket,
    hours_between,
    parse_bucket,
    user_field,
)
from analytics_pipeline.core.shards import pipeline_shards

Granularity = Literal["hour", "day"]
GRANULARITIES: tuple[Granularity, ...] = ("hour", "day")
ANY_EVENT = ""  # event_type of the uniques rollups' "any event type" rows (see schema.sql)
MAX_BUCKETS = 10_000
T = TypeVar("T")

# Park claims: add our token with an expiry (Redis clock); the key expires with its latest member.
_HOLD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
"""


# Uniques of event type $2 ('' = any) from day $3 on: the rollup rows (schema.sql), one per day.
_ROLLUP_SQL = """
SELECT day, users, last_seen_users FROM analytics_daily_uniques WHERE pipeline = $1 AND event_type = $2 AND day >= $3
"""

# For the Redis (user, day) pairs $4/$5, what PostgreSQL holds of them, decided by each user's last day
# in analytics_user_last_seen (one index search per Redis user): none or before the pair's day -> new
# that day ("redis" rows count them); that day -> already counted; after it (rare: Redis holds recent
# days) -> returned, the caller probes the per-user rows. The "total" row counts the Redis users whose
# last day is before $3 (or none): users not yet in the range's last_seen_users. Run per chunk of
# users (every pair of a user in the same chunk, so that chunks add up); a single day in $5 is the day
# of every user in $4 (Redis usually holds one day: no day sent per user).
_REDIS_PAIRS_SQL = """
WITH pairs AS MATERIALIZED (
    SELECT r.day, r.user_id, s.last_day
      FROM unnest({users}, CASE WHEN cardinality($5::date[]) = 1 AND cardinality({users}) > 1
                                THEN array_fill($5[1], ARRAY[cardinality({users})]) ELSE $5::date[] END)
           AS r(user_id, day)
      LEFT JOIN analytics_user_last_seen s
        ON s.pipeline = $1 AND s.event_type = $2 AND s.user_id = r.user_id AND s.user_id = ANY ({users})
)
SELECT 'redis' AS kind, day, count(*) FILTER (WHERE last_day IS NULL OR last_day < day) AS users,
       array_agg(user_id) FILTER (WHERE last_day > day) AS held_later
  FROM pairs GROUP BY day
UNION ALL
SELECT 'total', NULL, count(DISTINCT user_id) FILTER (WHERE last_day IS NULL OR last_day < $3), NULL
  FROM pairs
"""
# $4 is the users joined by US (one text: encoding 10,000 array elements cost the sidecar ~4x more;
# user ids are printable, so US cannot be in one), split by PostgreSQL; an id holding US anyway (not
# written by the sidecar) makes that chunk go as a text[].
_PAIRS_JOINED_SQL = _REDIS_PAIRS_SQL.replace("{users}", "string_to_array($4::text, chr(31))")
_PAIRS_ARRAY_SQL = _REDIS_PAIRS_SQL.replace("{users}", "$4::text[]")
# Redis users per statement: bounds the arrays encoded in one go (the sidecar's event loop stays free
# for ingest between chunks) and each statement's work.
UNIQUES_CHUNK_USERS = 10_000


class QueryInputError(ValueError):
    """A bad query parameter; ``parameter`` names it (the HTTP layer answers 400 with it)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class ConsistencyError(RuntimeError):
    """No consistent snapshot could be taken (claims kept racing even while held); retry later."""


@dataclass(frozen=True, slots=True)
class Point:
    """One bucket of a series: its start (a ``datetime`` for hours, a ``date`` for days) and its count."""

    bucket: datetime | date
    count: int

    def as_json(self) -> dict[str, Any]:
        return {"bucket": _iso(self.bucket), "count": self.count}


@dataclass(frozen=True)
class Series:
    """Counts per bucket over a range, zero-filled, oldest first."""

    granularity: Granularity
    event: str | None
    user_id: str | None
    points: list[Point]

    @property
    def total(self) -> int:
        return sum(point.count for point in self.points)

    def as_json(self) -> dict[str, Any]:
        return {"event": self.event, "granularity": self.granularity, "user_id": self.user_id,
                "series": [p.as_json() for p in self.points], "total": self.total}


@dataclass(frozen=True)
class Uniques:
    """Distinct users per day (``points``) and over the whole range (``distinct_total``, not a sum)."""

    event: str | None
    points: list[Point]
    distinct_total: int

    def as_json(self) -> dict[str, Any]:
        return {"event": self.event, "series": [p.as_json() for p in self.points],
                "distinct_total": self.distinct_total}


@dataclass(frozen=True)
class EventTotal:
    """One event type and its count over the queried days."""

    event: str
    count: int


@dataclass(frozen=True)
class DashboardSnapshot:
    """Everything the dashboard draws, from ONE consistent snapshot; lists are aligned with hours/days."""

    generated_at: datetime
    hours: list[datetime]
    days: list[date]
    hourly: dict[str, list[int]]
    daily: dict[str, list[int]]
    uniques: list[int]
    distinct_users: int
    totals: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"generated_at": _iso(self.generated_at), "hours": [_iso(h) for h in self.hours],
                "days": [_iso(d) for d in self.days], "hourly": self.hourly, "daily": self.daily,
                "uniques": self.uniques, "distinct_users": self.distinct_users, "totals": self.totals}


def _iso(value: datetime | date) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value.isoformat()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class _Request:
    kind: BucketKind
    bucket: str
    op: Literal["get", "sum", "all", "keys", "users", "usersum"]
    arg: str = ""


@dataclass
class RedisView:
    """The Redis part of a snapshot: per request, the live replies (one per shard) and the replies of
    uncommitted units (of any shard)."""

    live: list[list[Any]]
    pending: list[list[Any]]

    def replies(self, index: int) -> list[Any]:
        return [*(shard[index] for shard in self.live), *(unit[index] for unit in self.pending)]

    def number(self, index: int) -> int:
        return sum(int(reply) for reply in self.replies(index))

    def hash(self, index: int) -> dict[str, int]:
        merged: dict[str, int] = {}
        for reply in self.replies(index):
            for i in range(0, len(reply), 2):
                name = _text(reply[i])
                merged[name] = merged.get(name, 0) + int(reply[i + 1])
        return merged


def _as_day(value: date | datetime) -> date:
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).date()
    return value


def _as_hour(value: date | datetime, *, end: bool = False) -> datetime:
    if isinstance(value, datetime):
        moment = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.replace(minute=0, second=0, microsecond=0)
    start = datetime(value.year, value.month, value.day, tzinfo=UTC)
    return start + timedelta(hours=23) if end else start


def _check_range(start: object, end: object, count: int) -> None:
    if end < start:  # type: ignore[operator]
        raise QueryInputError("to", "must not be before 'from'")
    if count > MAX_BUCKETS:
        raise QueryInputError("from", f"range too long: {count} buckets (at most {MAX_BUCKETS})")


def _check_name(parameter: str, value: str | None) -> None:
    if value is not None and (not value or not value.isprintable() or len(value) > 1024):
        raise QueryInputError(parameter, "must be a non-empty printable string of at most 1024 characters")


DEFAULT_DAYS = 30
DEFAULT_HOURS = 48


def parse_moment(parameter: str, text: str) -> date | datetime:
    """``YYYY-MM-DD`` (a date) or an ISO 8601 datetime (``Z`` or an offset; naive means UTC)."""
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise QueryInputError(parameter, f"not a date (YYYY-MM-DD) or ISO 8601 datetime: {text!r}") from None
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-05:00 is in the year 10000 in UTC
        raise QueryInputError(parameter, f"out of range: {text!r} is not between 0001-01-01 and 9999-12-31 "
                              "in UTC") from None


def resolve_range(granularity: str, start: str | None, end: str | None,
                  now: datetime | None = None) -> tuple[date | datetime, date | datetime]:
    """Parse ``from``/``to`` texts; defaults: up to now, the last 48 hours (hour) or 30 days (day)."""
    now = now or datetime.now(UTC)
    try:
        if granularity == "hour":
            last: date | datetime = parse_moment("to", end) if end else now
            if start:
                return parse_moment("from", start), last
            last_hour = last if isinstance(last, datetime) else datetime(last.year, last.month, last.day, 23,
                                                                         tzinfo=UTC)
            return last_hour - timedelta(hours=DEFAULT_HOURS - 1), last
        last = parse_moment("to", end) if end else now.date()
        if start:
            return parse_moment("from", start), last
        return (last.date() if isinstance(last, datetime) else last) - timedelta(days=DEFAULT_DAYS - 1), last
    except OverflowError:  # only the default start can overflow: parse_moment refuses the rest
        span = f"{DEFAULT_HOURS} hours" if granularity == "hour" else f"{DEFAULT_DAYS} days"
        raise QueryInputError("to", f"too early: the default range (the {span} up to 'to') would start "
                              "before 0001-01-01; give 'from' as well") from None


# Point reads of small hashes (daily/hourly buckets: one field per event type; one per-user field) go
# into MULTI/EXEC, at most this many per transaction so that none holds Redis for more than ~1 ms.
MULTI_COMMANDS = 1000
_SMALL_OPS = frozenset({"get", "sum", "all", "keys"})


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _queue(pipe: Any, request: _Request, key: str) -> None:
    """The one Redis command that answers a small-hash ``request`` on ``key`` (reduced by :func:`_reduce`).

    Only daily/hourly buckets are read whole (one field per event type); per-user buckets are read
    by HGET/HMGET of known fields or in HSCAN pieces (:meth:`Queries._scan`), never whole.
    """
    if request.op == "get":
        pipe.hget(key, request.arg)
    elif request.op == "sum":
        pipe.hvals(key)
    elif request.op == "keys":
        pipe.hkeys(key)
    elif request.op == "all":
        pipe.hgetall(key)
    else:
        raise ValueError(f"{request.op!r} is not a small-hash read")


def _reduce(request: _Request, reply: Any) -> Any:
    """A raw reply as :class:`RedisView` reads it: a number, flat field/count pairs, or names."""
    op = request.op
    if op == "get":
        return int(reply or 0)
    if op == "sum":
        return sum(int(value) for value in reply)
    if op == "keys":
        return [_text(name) for name in reply]
    if op == "all":
        return [item for pair in reply.items() for item in pair]
    raise ValueError(f"unknown snapshot op {op!r}")


@dataclass
class _Scan:
    """One per-user bucket (live or staged) read in HSCAN pieces; ``found`` merges the pieces (a piece
    may repeat a field: merging by name counts it once)."""

    request: _Request
    key: str
    slot: list[Any]
    index: int
    cursor: int = 0
    found: dict[str, Any] = field(default_factory=dict)

    @property
    def match(self) -> str | None:
        if self.request.op == "users":
            return _glob_escape(self.request.arg) + USER_FIELD_SEPARATOR + "*" if self.request.arg else None
        return "*" + USER_FIELD_SEPARATOR + _glob_escape(self.request.arg)  # usersum

    def add(self, piece: dict[Any, Any]) -> None:
        """Merge one HSCAN piece (done per piece: no pass over the whole bucket at the end)."""
        if piece and isinstance(next(iter(piece)), bytes):  # a client without decode_responses
            piece = {name.decode(): count for name, count in piece.items()}
        separator, wanted = USER_FIELD_SEPARATOR, self.request.arg
        if self.request.op == "users":  # found: user -> None, distinct, in field order
            if wanted:  # MATCH let through only fields starting with the event type and US
                prefix = wanted + separator
                cut = len(prefix)
                self.found.update(dict.fromkeys([name[cut:] for name in piece if name.startswith(prefix)]))
            else:
                self.found.update(dict.fromkeys([name.partition(separator)[2] for name in piece
                                                 if separator in name]))
        else:  # usersum: found: the user's fields -> count (MATCH let through only the user's fields)
            for name, count in piece.items():
                if name.partition(separator)[2] == wanted:
                    self.found[name] = count

    def result(self) -> Any:
        if self.request.op == "users":
            return list(self.found)
        return sum(int(count) for count in self.found.values())


class Queries:
    """Exact reads of one pipeline (all its shards) over a Redis client and an asyncpg pool (or one connection).

    ``redis_days`` bounds how far back :meth:`event_types` looks for unflushed daily buckets when no
    start is given (live buckets cannot outlive the counter TTL; see :meth:`for_config`).
    ``scan_count`` is the COUNT of each HSCAN piece of a per-user bucket. ``types_from_daily``: a
    user's counts over all event types are HMGET of ``event_type US user_id`` for the event types the
    daily buckets and rows know (needs the ``daily`` granularity on; else the user's fields are
    found with HSCAN MATCH in bounded pieces). ``after_snapshot`` is a test hook run between the
    Redis snapshot and the PostgreSQL read.
    """

    def __init__(self, client: aioredis.Redis, db: asyncpg.Pool | asyncpg.Connection, pipeline: str, *,
                 redis_days: int = 16, max_retries: int = 3, max_holds: int = 3, hold_ms: int = 2000,
                 scan_count: int = 1000, types_from_daily: bool = True,
                 after_snapshot: Callable[[int], Awaitable[None]] | None = None, shards: int = 1) -> None:
        self.client = client
        self.db = db
        self.keys = PipelineKeys(pipeline)  # shard 0 (the pipeline's name: the PostgreSQL rows' key)
        self.shards = shards  # configured shards; the registered ones are read too (core/shards.py)
        self.redis_days = redis_days
        self.max_retries = max_retries
        self.max_holds = max_holds
        self.hold_ms = hold_ms
        self.scan_count = scan_count
        self.types_from_daily = types_from_daily
        self.after_snapshot = after_snapshot
        self.retries = 0  # lost seqlock races so far (observability and tests)
        self.holds = 0  # times claims were parked
        self._hold_script = client.register_script(_HOLD_LUA)

    @classmethod
    def for_config(cls, client: aioredis.Redis, db: asyncpg.Pool | asyncpg.Connection, config: Config,
                   **options: Any) -> Queries:
        """Queries of ``config.pipeline``, looking back far enough for any live bucket (2 x TTL + 2 days)."""
        ttl_days = -(-config.counters.ttl_seconds // 86400)
        options = {"scan_count": config.queries.scan_count, "shards": config.counters.shards,
                   "types_from_daily": "daily" in config.counters.granularities, **options}
        return cls(client, db, config.pipeline, redis_days=2 * ttl_days + 2, **options)

    # public API ---------------------------------------------------------------------------------
    async def counts(self, event: str | None, start: date | datetime, end: date | datetime,
                     granularity: Granularity = "day", user_id: str | None = None) -> Series:
        """Counts of ``event`` (None: all event types) per hour or day from ``start`` to ``end`` inclusive.

        With ``user_id`` the counts are that user's (day granularity only). Dates/datetimes are UTC.
        """
        _check_name("event", event)
        _check_name("user_id", user_id)
        if granularity not in GRANULARITIES:
            raise QueryInputError("granularity", "must be 'hour' or 'day'")
        if user_id is not None and granularity != "day":
            raise QueryInputError("granularity", "per-user counts are kept per day only: use 'day'")
        if granularity == "hour":
            first, last = _as_hour(start), _as_hour(end, end=True)
            _check_range(first, last, int((last - first).total_seconds() // 3600) + 1)
            buckets: list[datetime] | list[date] = hours_between(first, last)
            labels = [hour_bucket(h) for h in buckets]  # type: ignore[arg-type]
        else:
            first_day, last_day = _as_day(start), _as_day(end)
            _check_range(first_day, last_day, (last_day - first_day).days + 1)
            buckets = days_between(first_day, last_day)
            labels = [day_bucket(d) for d in buckets]
        requests = [self._count_request(granularity, label, event, user_id) for label in labels]

        async def from_postgres(conn: asyncpg.Connection, view: RedisView) -> Series:
            stored = await self._stored_counts(conn, granularity, buckets[0], buckets[-1], event, user_id)
            points = [Point(b, stored.get(b, 0) + view.number(i)) for i, b in enumerate(buckets)]
            return Series(granularity, event, user_id, points)

        return await self._consistent(requests, from_postgres)

    async def uniques(self, event: str | None, start_day: date | datetime, end_day: date | datetime) -> Uniques:
        """Distinct users per day (of ``event``, or of any event type) = |union of PostgreSQL and Redis user ids|."""
        _check_name("event", event)
        first, last = _as_day(start_day), _as_day(end_day)
        _check_range(first, last, (last - first).days + 1)
        days = days_between(first, last)
        requests = [_Request("u", day_bucket(d), "users", event or "") for d in days]

        async def from_postgres(conn: asyncpg.Connection, view: RedisView) -> Uniques:
            per_day, total = await self._stored_uniques(conn, days, event, view, 0)
            return Uniques(event, [Point(d, per_day.get(d, 0)) for d in days], total)

        return await self._consistent(requests, from_postgres)

    async def event_types(self, start: date | datetime | None = None,
                          end: date | datetime | None = None) -> list[EventTotal]:
        """Every event type seen (daily counts) with its total from ``start`` to ``end`` (None: unbounded)."""
        today = datetime.now(UTC).date()
        first = _as_day(start) if start is not None else None
        last = _as_day(end) if end is not None else None
        if first is not None and last is not None and last < first:
            raise QueryInputError("to", "must not be before 'from'")
        # live buckets cannot be older than redis_days (nor from after tomorrow): any range is fine
        redis_first = max(first or date.min, today - timedelta(days=self.redis_days))
        redis_last = min(last or date.max, today + timedelta(days=1))
        days = days_between(redis_first, redis_last) if redis_last >= redis_first else []
        requests = [_Request("d", day_bucket(d), "all") for d in days]

        async def from_postgres(conn: asyncpg.Connection, view: RedisView) -> list[EventTotal]:
            rows = await conn.fetch(
                "SELECT event_type, sum(count)::bigint AS n FROM analytics_daily WHERE pipeline = $1 "
                "AND ($2::date IS NULL OR day >= $2) AND ($3::date IS NULL OR day <= $3) GROUP BY event_type",
                self.keys.pipeline, first, last)
            totals = {row["event_type"]: int(row["n"]) for row in rows}
            for i in range(len(days)):
                for name, count in view.hash(i).items():
                    totals[name] = totals.get(name, 0) + count
            ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
            return [EventTotal(name, count) for name, count in ranked if count]

        return await self._consistent(requests, from_postgres)

    async def dashboard_snapshot(self, now: datetime | None = None, hours: int = 48,
                                 days: int = 30) -> DashboardSnapshot:
        """Hourly counts per event type (last ``hours``), daily per event type and daily uniques (last
        ``days``) from one consistent snapshot: one Redis snapshot, one PostgreSQL transaction."""
        if not 1 <= hours <= MAX_BUCKETS:
            raise QueryInputError("hours", f"must be 1..{MAX_BUCKETS}")
        if not 1 <= days <= MAX_BUCKETS:
            raise QueryInputError("days", f"must be 1..{MAX_BUCKETS}")
        now = (now or datetime.now(UTC)).astimezone(UTC)
        last_hour = _as_hour(now)
        hour_list = hours_between(last_hour - timedelta(hours=hours - 1), last_hour)
        day_list = days_between(now.date() - timedelta(days=days - 1), now.date())
        requests = ([_Request("h", hour_bucket(h), "all") for h in hour_list]
                    + [_Request("d", day_bucket(d), "all") for d in day_list]
                    + [_Request("u", day_bucket(d), "users") for d in day_list])
        nh, nd = len(hour_list), len(day_list)

        async def from_postgres(conn: asyncpg.Connection, view: RedisView) -> DashboardSnapshot:
            pipeline = self.keys.pipeline
            hourly = self._grid(await conn.fetch(
                "SELECT event_type, hour AS b, count FROM analytics_hourly "
                "WHERE pipeline = $1 AND hour >= $2 AND hour <= $3", pipeline, hour_list[0], hour_list[-1]),
                hour_list, [view.hash(i) for i in range(nh)])
            daily = self._grid(await conn.fetch(
                "SELECT event_type, day AS b, count FROM analytics_daily "
                "WHERE pipeline = $1 AND day >= $2 AND day <= $3", pipeline, day_list[0], day_list[-1]),
                day_list, [view.hash(nh + i) for i in range(nd)])
            per_day, distinct = await self._stored_uniques(conn, day_list, None, view, nh + nd)
            return DashboardSnapshot(
                generated_at=now, hours=hour_list, days=day_list, hourly=hourly, daily=daily,
                uniques=[per_day.get(d, 0) for d in day_list], distinct_users=distinct,
                totals={name: sum(values) for name, values in daily.items()})

        return await self._consistent(requests, from_postgres)

    # PostgreSQL parts ------------------------------------------------------------------------------
    def _count_request(self, granularity: Granularity, label: str, event: str | None,
                       user_id: str | None) -> _Request:
        if user_id is not None:
            if event is not None:
                return _Request("u", label, "get", user_field(event, user_id))
            return _Request("u", label, "usersum", user_id)
        kind: BucketKind = "h" if granularity == "hour" else "d"
        return _Request(kind, label, "get", event) if event is not None else _Request(kind, label, "sum")

    async def _stored_counts(self, conn: asyncpg.Connection, granularity: Granularity, first: date | datetime,
                             last: date | datetime, event: str | None, user_id: str | None) -> dict[Any, int]:
        if user_id is not None:
            # the key is day-major (pipeline, day, user_id, event_type): one index probe per day
            sql = ("SELECT day AS b, sum(count)::bigint AS n FROM analytics_user_daily WHERE pipeline = $1 "
                   "AND day = ANY($2::date[]) AND user_id = $4 AND ($3::text IS NULL OR event_type = $3) "
                   "GROUP BY day")
            args: tuple[Any, ...] = (self.keys.pipeline, days_between(_as_day(first), _as_day(last)), event, user_id)
        else:
            table, column = ("analytics_hourly", "hour") if granularity == "hour" else ("analytics_daily", "day")
            sql = (f"SELECT {column} AS b, sum(count)::bigint AS n FROM {table} WHERE pipeline = $1 "
                   f"AND {column} >= $2 AND {column} <= $3 AND ($4::text IS NULL OR event_type = $4) "
                   f"GROUP BY {column}")
            args = (self.keys.pipeline, first, last, event)
        return {row["b"]: int(row["n"]) for row in await conn.fetch(sql, *args)}

    async def _stored_uniques(self, conn: asyncpg.Connection, days: list[date], event: str | None,
                              view: RedisView, offset: int) -> tuple[dict[date, int], int]:
        """Distinct users per day and over all ``days`` (of ``event`` or any event type): PostgreSQL's
        rollups plus the Redis users of ``view`` PostgreSQL does not hold yet (see ``_REDIS_PAIRS_SQL``)."""
        pipeline, first, last, event_type = self.keys.pipeline, days[0], days[-1], event or ANY_EVENT
        chunks = await self._redis_user_chunks(days, view, offset)
        per_day: dict[date, int] = {}
        in_range = redis_total = 0
        seen_later = False
        later: list[tuple[date, str]] = []
        for day, users, last_seen_users in await conn.fetch(_ROLLUP_SQL, pipeline, event_type, first):
            if day > last:
                seen_later = seen_later or last_seen_users != 0
            else:
                per_day[day] = per_day.get(day, 0) + users
                in_range += last_seen_users
        redis_users: list[str] = []
        for pair_users, pair_days in chunks:
            redis_users += pair_users
            joined = USER_FIELD_SEPARATOR.join(pair_users)
            if joined.count(USER_FIELD_SEPARATOR) == len(pair_users) - 1:
                statement, users_arg = _PAIRS_JOINED_SQL, joined
            else:
                statement, users_arg = _PAIRS_ARRAY_SQL, pair_users
            for kind, day, users, held_later in await conn.fetch(
                    statement, pipeline, event_type, first, users_arg, pair_days):
                if kind == "redis":
                    per_day[day] = per_day.get(day, 0) + users
                    later += [(day, user) for user in held_later or ()]
                else:
                    redis_total += users
        if later:  # Redis (day, user) whose last day in PostgreSQL is after that day: one probe each
            for row in await conn.fetch(
                    "SELECT r.day, count(*) AS n FROM unnest($2::date[], $3::text[]) AS r(day, user_id)"
                    " LEFT JOIN LATERAL (SELECT true AS hit FROM analytics_user_daily u WHERE u.pipeline = $1"
                    " AND u.day = r.day AND u.user_id = r.user_id AND ($4::text IS NULL OR u.event_type = $4)"
                    " LIMIT 1) AS stored ON true WHERE stored.hit IS NULL GROUP BY r.day",
                    pipeline, [day for day, _ in later], [user for _, user in later], event):
                per_day[row["day"]] += int(row["n"])
        if not seen_later:
            return per_day, in_range + redis_total
        total = await conn.fetchval(  # a past range with users seen after it: count from the per-user rows
            "SELECT count(DISTINCT user_id) FROM ("
            " SELECT user_id FROM analytics_user_daily WHERE pipeline = $1 AND day >= $2 AND day <= $3"
            " AND ($4::text IS NULL OR event_type = $4)"
            " UNION ALL SELECT unnest($5::text[])) AS u",
            pipeline, first, last, event, redis_users)
        return per_day, int(total)

    @staticmethod
    async def _redis_user_chunks(days: list[date], view: RedisView,
                                 offset: int) -> list[tuple[list[str], list[date]]]:
        """The Redis (user, day) pairs of ``days`` in chunks of about ``UNIQUES_CHUNK_USERS`` users, every
        pair of one user in the same chunk (so the chunks' distinct totals add up); a chunk whose pairs
        are all of one day carries that day once (``_REDIS_PAIRS_SQL`` spreads it)."""
        per_day: list[tuple[date, list[str]]] = []
        for i, day in enumerate(days):
            replies = [reply for reply in view.replies(offset + i) if reply]
            if len(replies) > 1:  # live and staged copies may hold the same user
                replies = [list(dict.fromkeys(user for reply in replies for user in reply))]
            if replies:
                per_day.append((day, replies[0]))
            await asyncio.sleep(0)  # let ingest run between days of a big range
        size = UNIQUES_CHUNK_USERS
        if len(per_day) == 1:  # the usual case: Redis holds users of one day (today)
            day, users = per_day[0]
            return [(users[start:start + size], [day]) for start in range(0, len(users), size)]
        days_of: dict[str, list[date]] = {}  # Redis user -> the days Redis holds them
        for day, users in per_day:
            for start in range(0, len(users), size):
                for user in users[start:start + size]:
                    days_of.setdefault(user, []).append(day)
                await asyncio.sleep(0)
        chunks: list[tuple[list[str], list[date]]] = []
        all_users = list(days_of)
        for start in range(0, len(all_users), size):
            pair_users: list[str] = []
            pair_days: list[date] = []
            for user in all_users[start:start + size]:
                user_days = days_of[user]
                pair_users += [user] * len(user_days)
                pair_days += user_days
            chunks.append((pair_users, pair_days))
        return chunks

    @staticmethod
    def _grid(rows: Sequence[asyncpg.Record], buckets: Sequence[date | datetime],
              live: list[dict[str, int]]) -> dict[str, list[int]]:
        index = {b: i for i, b in enumerate(buckets)}
        grid: dict[str, list[int]] = {}
        for row in rows:
            grid.setdefault(row["event_type"], [0] * len(buckets))[index[row["b"]]] += int(row["count"])
        for i, counts in enumerate(live):
            for name, count in counts.items():
                grid.setdefault(name, [0] * len(buckets))[i] += count
        return dict(sorted(grid.items()))

    # the seqlock -------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if isinstance(self.db, asyncpg.Pool):
            async with self.db.acquire() as conn:
                yield conn
        else:
            yield self.db

    async def _snapshot(self, conn: asyncpg.Connection, requests: list[_Request],
                        keys: PipelineKeys) -> tuple[bytes | str, list[Any], dict[str, list[Any]]]:
        """Of one shard (``keys``): ``claim_seq``, the requests' replies on the live buckets, and per
        in-flight unit on its staged copies.

        No Redis call does work proportional to the users of a bucket (docs/queries.md, "Reads never
        block writes"): small hashes (daily/hourly buckets, single per-user fields) are read in
        MULTI/EXEC with claim_seq and the in-flight units; a user's counts are HMGET of the fields
        ``event_type US user_id`` of the known event types; the users of a per-user bucket come from
        HSCAN in pieces of ``scan_count``. That is as good as one atomic read, because between the
        first read of claim_seq and its check after the PostgreSQL read (the seqlock) no claim
        happened: live buckets only grew (every count acknowledged before the query is seen, none
        that was not sent), no unit appeared, and a listed unit's staging keys never change and are
        deleted only after its ledger row is committed — which the PostgreSQL snapshot, taken after
        every read here, then sees (the unit is skipped whatever was read of it).
        """
        live_keys = [keys.bucket(r.kind, r.bucket) for r in requests]
        small = [i for i, r in enumerate(requests) if r.op in _SMALL_OPS]
        lookups = [i for i, r in enumerate(requests) if r.op == "usersum" and self.types_from_daily]
        scans = [i for i, r in enumerate(requests)
                 if r.op == "users" or (r.op == "usersum" and not self.types_from_daily)]
        # the event types a user's fields may have: every event type of those days' daily buckets
        type_days = sorted({requests[i].bucket for i in lookups})
        type_requests = [_Request("d", day, "keys") for day in type_days]
        reads = [(requests[i], live_keys[i]) for i in small]
        reads += [(r, keys.bucket("d", r.bucket)) for r in type_requests]

        seq, units, replies = await self._small_reads(reads, keys)
        live: list[Any] = [None] * len(requests)
        staged: dict[str, list[Any]] = {unit: [None] * len(requests) for unit in units}
        types: set[str] = set()
        for (request, _), reply in zip(reads, replies, strict=True):
            if request.op == "keys":
                types.update(_reduce(request, reply))
        for i, reply in zip(small, replies[:len(small)], strict=True):
            live[i] = _reduce(requests[i], reply)
        scanning = [_Scan(requests[i], key, slot, i)
                    for i in scans
                    for key, slot in [(live_keys[i], live),
                                      *((keys.staging(u, live_keys[i]), staged[u]) for u in units)]]
        if (units and reads) or scanning:
            # one round trip: the same small reads of every listed unit's staging keys, and the first
            # HSCAN piece of every per-user bucket (a small bucket is then read whole, as one piece)
            async with self.client.pipeline(transaction=False) as pipe:
                for unit in units:
                    for request, key in reads:
                        _queue(pipe, request, keys.staging(unit, key))
                for scan in scanning:
                    pipe.hscan(scan.key, 0, match=scan.match, count=self.scan_count)
                answers = await pipe.execute()
            unit_replies, first_pieces = answers[:len(units) * len(reads)], answers[len(units) * len(reads):]
            for scan, (cursor, piece) in zip(scanning, first_pieces, strict=True):
                scan.cursor = int(cursor)
                scan.add(piece)
            for n, unit in enumerate(units):
                part = unit_replies[n * len(reads):(n + 1) * len(reads)]
                for (request, _), reply in zip(reads, part, strict=True):
                    if request.op == "keys":
                        types.update(_reduce(request, reply))
                for i, reply in zip(small, part[:len(small)], strict=True):
                    staged[unit][i] = _reduce(requests[i], reply)
        if lookups:
            # ... and of their committed daily rows: a unit may have moved them to PostgreSQL while the
            # per-user bucket of the same writes is still live or staged (read after the staged keys:
            # a unit cleaned up before that had committed before it)
            types.update(row["event_type"] for row in await conn.fetch(
                "SELECT DISTINCT event_type FROM analytics_daily WHERE pipeline = $1 AND day = ANY($2::date[])",
                self.keys.pipeline, [parse_bucket("d", day).date() for day in type_days]))
            await self._lookups(requests, lookups, live_keys, sorted(types), live, staged, keys)
        await self._scan([scan for scan in scanning if scan.cursor != 0])
        for scan in scanning:
            scan.slot[scan.index] = scan.result()
        return seq or "0", live, staged

    async def _small_reads(self, reads: list[tuple[_Request, str]],
                           keys: PipelineKeys) -> tuple[bytes | str, list[str], list[Any]]:
        """claim_seq, the in-flight units and ``reads`` on small hashes, in MULTI/EXEC of at most
        ``MULTI_COMMANDS`` reads each (the first one with claim_seq and the units)."""
        replies: list[Any] = []
        seq: bytes | str = "0"
        units: list[str] = []
        for start in range(0, max(len(reads), 1), MULTI_COMMANDS):
            async with self.client.pipeline(transaction=True) as multi:
                if start == 0:
                    multi.get(keys.claim_seq)
                    multi.zrange(keys.inflight, 0, -1)
                for request, key in reads[start:start + MULTI_COMMANDS]:
                    _queue(multi, request, key)
                answer = await multi.execute()
            if start == 0:
                seq, raw_units, *answer = answer
                units = [_text(unit) for unit in raw_units]
            replies += answer
        return seq or "0", units, replies

    async def _lookups(self, requests: list[_Request], lookups: list[int], live_keys: list[str],
                       types: list[str], live: list[Any], staged: dict[str, list[Any]], keys: PipelineKeys) -> None:
        """A user's counts over all event types: HMGET of ``event_type US user_id`` for each known event
        type, at most ``scan_count`` fields per call, on the live bucket and every staged copy."""
        for i in lookups:
            live[i] = 0
            for slot in staged.values():
                slot[i] = 0
        if not types:
            return
        owners: list[tuple[list[Any], int]] = []
        async with self.client.pipeline(transaction=False) as pipe:
            for i in lookups:
                fields = [user_field(event_type, requests[i].arg) for event_type in types]
                for key, slot in [(live_keys[i], live),
                                  *((keys.staging(u, live_keys[i]), s) for u, s in staged.items())]:
                    for start in range(0, len(fields), self.scan_count):
                        pipe.hmget(key, fields[start:start + self.scan_count])
                        owners.append((slot, i))
            replies = await pipe.execute()
        for (slot, i), values in zip(owners, replies, strict=True):
            slot[i] += sum(int(value) for value in values if value is not None)

    async def _scan(self, scans: list[_Scan]) -> None:
        """Continue reading per-user buckets in HSCAN pieces of ``scan_count`` fields (one piece of every
        unfinished bucket per round trip) until every cursor is back to 0."""
        active = scans
        while active:
            async with self.client.pipeline(transaction=False) as pipe:
                for scan in active:
                    pipe.hscan(scan.key, scan.cursor, match=scan.match, count=self.scan_count)
                pieces = await pipe.execute()
            for scan, (cursor, piece) in zip(active, pieces, strict=True):
                scan.cursor = int(cursor)
                scan.add(piece)
            active = [scan for scan in active if scan.cursor != 0]

    async def _read_postgres(self, conn: asyncpg.Connection, live: list[list[Any]], units: dict[str, list[Any]],
                             read: Callable[[asyncpg.Connection, RedisView], Awaitable[T]]) -> T:
        """``read`` in one REPEATABLE READ snapshot, with the staged copies of units not yet in the ledger."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # asyncpg prepares these statements once per connection, and PostgreSQL switches a
            # prepared statement to a generic plan after 5 runs: with "$4 IS NULL OR event_type
            # = $4" and unknown ranges that plan made uniques 4-8x slower (benchmarks/query.py).
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            committed: set[str] = set()
            if units:
                rows = await conn.fetch(
                    "SELECT unit_id FROM analytics_flush_ledger WHERE pipeline = $1 AND unit_id = ANY($2)",
                    self.keys.pipeline, list(units))
                committed = {row["unit_id"] for row in rows}
            view = RedisView(live, [r for unit, r in units.items() if unit not in committed])
            return await read(conn, view)

    async def _hold(self, shards: list[PipelineKeys], hold_ms: int) -> str:
        """Park the claims of every shard for ``hold_ms`` (one token for all)."""
        token = uuid.uuid4().hex
        await asyncio.gather(*(self._hold_script(keys=[keys.claim_hold], args=[token, hold_ms]) for keys in shards))
        self.holds += 1
        return token

    async def _claim_seqs(self, shards: list[PipelineKeys]) -> list[str]:
        """Every shard's ``claim_seq`` now (step 3 of the seqlock)."""
        return [_text(seq or "0") for seq in await asyncio.gather(*(self.client.get(k.claim_seq) for k in shards))]

    async def _consistent(self, requests: list[_Request],
                          read: Callable[[asyncpg.Connection, RedisView], Awaitable[T]]) -> T:
        """Run ``read`` on a PostgreSQL snapshot consistent with a Redis snapshot (see module docstring)."""
        for attempt in range(self.max_retries + self.max_holds):
            shards = await pipeline_shards(self.client, self.keys.pipeline, self.shards)
            token = None
            if attempt >= self.max_retries:
                token = await self._hold(shards, self.hold_ms << (attempt - self.max_retries))
            try:
                async with self._connection() as conn:
                    seqs: list[str] = []
                    lives: list[list[Any]] = []
                    units: dict[str, list[Any]] = {}
                    for keys in shards:  # one after the other: the lookups use the one connection
                        seq, live, staged = await self._snapshot(conn, requests, keys)
                        seqs.append(_text(seq))
                        lives.append(live)
                        units.update(staged)
                    if self.after_snapshot is not None:
                        await self.after_snapshot(attempt)
                    result = await self._read_postgres(conn, lives, units, read)
                if await self._claim_seqs(shards) == seqs:
                    return result
                self.retries += 1
            finally:
                if token is not None:
                    await asyncio.gather(*(self.client.zrem(keys.claim_hold, token) for keys in shards))
        raise ConsistencyError(f"pipeline {self.keys.pipeline}: flush claims kept racing the query "
                               f"({self.max_retries + self.max_holds} attempts); retry")
