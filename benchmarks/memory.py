#!/usr/bin/env python3
"""Redis bytes per event: what one more distinct user, message_id or event name costs the live buckets.

Events go through the real group committer (sidecar/committer.py and its Lua) into a throwaway
redis-server with its default config (hash-max-listpack-entries 128). For each case it prints, per
distinct item: the sum of ``MEMORY USAGE key SAMPLES 0`` over the keys written (value + key name + its
dict entry) plus 32 B per key with a TTL (its entry in the expires dict, which MEMORY USAGE leaves out),
and ``INFO memory`` used_memory before/after (allocator rounding and dict growth included). Memory is
deterministic for a given Redis build: the figures do not depend on the machine's load.

  per user field   N distinct users, one event name: the per-user daily bucket (field = event US user)
  per message_id   N distinct message ids, one event name: the dedup shards (and, for comparison, the
                   one-key-per-id layout of the previous release, SET ap:{p}:msg:<id> 1 EX window)
  per event name   N distinct event names: the daily bucket (the hourly one costs the same again)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import print_header, table

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.sidecar.committer import GroupCommitter

EXPIRES_ENTRY_BYTES = 32  # a key's entry in Redis's expires dict (dictEntry 24 B + bucket pointer 8 B)
BATCH = 2000


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def keys_bytes(client: aioredis.Redis, pattern: str) -> tuple[int, int, set[str]]:
    """(MEMORY USAGE + expires entries, keys, encodings) of the keys matching ``pattern``."""
    total = count = 0
    encodings: set[str] = set()
    async for key in client.scan_iter(match=pattern, count=1000):
        total += int(await client.memory_usage(key, samples=0))
        if await client.ttl(key) >= 0:
            total += EXPIRES_ENTRY_BYTES
        encodings.add(await client.object("encoding", key))
        count += 1
    return total, count, encodings


async def measure(client: aioredis.Redis, url: str, what: str, n: int, granularity: str,
                  make: Callable[[int, datetime], Event], pattern: Callable[[PipelineKeys], str]) -> list[str]:
    pipeline = f"bench/mem-{uuid.uuid4().hex[:10]}"
    keys = PipelineKeys(pipeline)
    config = parse_config({"pipeline": pipeline, "redis_url": url, "counters": {"granularities": [granularity]}})
    committer = GroupCommitter(config)
    before = await used_memory(client)
    try:
        now = datetime.now(UTC)
        for start in range(0, n, BATCH):
            await committer.commit([make(i, now) for i in range(start, min(start + BATCH, n))])
    finally:
        await committer.close()
    after = await used_memory(client)
    total, count, encodings = await keys_bytes(client, pattern(keys))
    return [what, f"{n:,}", f"{total / n:.1f}", f"{(after - before) / n:.1f}", f"{count:,}",
            ",".join(sorted(encodings))]


async def legacy_message_ids(client: aioredis.Redis, n: int) -> list[str]:
    """The previous release's layout: one SET ap:{p}:msg:<id> 1 NX EX 86400 per message id."""
    keys = PipelineKeys(f"bench/mem-{uuid.uuid4().hex[:10]}")
    before = await used_memory(client)
    for start in range(0, n, BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + BATCH, n)):
                pipe.set(keys.message(str(uuid.UUID(int=i))), 1, nx=True, ex=86400)
            await pipe.execute()
    after = await used_memory(client)
    total, count, encodings = await keys_bytes(client, keys.scan_pattern)
    return ["per message_id, before (1 key/id)", f"{n:,}", f"{total / n:.1f}", f"{(after - before) / n:.1f}",
            f"{count:,}", ",".join(sorted(encodings))]


async def main_async(sizes: list[int]) -> int:
    with tempfile.TemporaryDirectory(prefix="ap-bench-memory-") as folder:
        server = RedisServer(Path(folder) / "redis").start()
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        try:
            version = (await client.info("server"))["redis_version"]
            listpack = await client.config_get("hash-max-listpack-*")
            print_header("Redis bytes per event (benchmarks/memory.py)", redis_version=f"{version} (throwaway, "
                         f"hash-max-listpack-entries {listpack['hash-max-listpack-entries']}, "
                         f"-value {listpack['hash-max-listpack-value']})", postgres_version="not used")
            cases: list[tuple[str, str, Callable[[int, datetime], Event], Callable[[PipelineKeys], str]]] = [
                ("per user field", "user_daily", lambda i, now: Event("page_view", f"user-{i:08d}", now),
                 lambda k: k.scan_pattern[:-1] + "u:*"),
                ("per message_id", "daily", lambda i, now: Event("page_view", None, now, str(uuid.UUID(int=i))),
                 lambda k: k.dedup_scan_pattern),
                ("per event name", "daily", lambda i, now: Event(f"event_{i:06d}", None, now),
                 lambda k: k.scan_pattern[:-1] + "d:*"),
            ]
            rows = []
            for n in sizes:
                for what, granularity, make, pattern in cases:
                    rows.append(await measure(client, server.url, what, n, granularity, make, pattern))
                rows.append(await legacy_message_ids(client, n))
            print(table(["what", "distinct", "B each (MEMORY USAGE)", "B each (used_memory)", "keys", "encoding"],
                        rows))
            print("\nuser ids 'user-00000001' (13 B), message ids UUIDs (36 B), event names 'event_000001' (12 B).")
        finally:
            await client.aclose()
            server.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,000 and 10,000 of each")
    parser.add_argument("--sizes", help="comma-separated counts (default 1000,10000,100000)")
    args = parser.parse_args()
    sizes = [int(s) for s in (args.sizes or ("1000,10000" if args.quick else "1000,10000,100000")).split(",")]
    return asyncio.run(main_async(sizes))


if __name__ == "__main__":
    raise SystemExit(main())
