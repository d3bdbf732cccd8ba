"""Capacity figures and model: what one sidecar, one Redis master, one flusher and PostgreSQL cost per event.

    .venv/bin/python benchmarks/capacity.py                  # 3 repetitions of everything (~6 min)
    .venv/bin/python benchmarks/capacity.py --quick          # 1 repetition, short runs, 100k-row flushes (~1 min)
    .venv/bin/python benchmarks/capacity.py --only sidecar   # or: flush
    .venv/bin/python benchmarks/capacity.py --save figures.json       # keep the measured figures
    .venv/bin/python benchmarks/capacity.py --model figures.json --pods 2000 --events-per-request 20
                                                             # the model again from saved figures, other assumptions
    .venv/bin/python benchmarks/capacity.py --model figures.json --cluster cluster.json --wait-replicas 1
                                                             # ... with cluster.py's per-request CPU (master+replica)

Measured (throwaway servers from core.services, loopback only):

- ``sidecar``: the real ``analytics-pipeline sidecar`` process on a throwaway Redis, loaded by ``wrk``
  (its own process; only the sidecar's and redis-server's CPU are counted, from /proc/<pid>/stat) with
  benchmarks/ingest.py's loads: single events and batches of 100, at concurrency 1 (every request is its
  own group commit: the regime of a pod posting ~100 events/s, whose requests are milliseconds apart) and
  at concurrency 32 (saturated: group commits carry many requests). Per load: events/s, sidecar CPU per
  request and per event, Redis CPU per request and per event. Also an idle sidecar's CPU (timers, probes).
- ``flush``: one flush (flusher.run.PipelineFlush, as benchmarks/flush.py) of N counters on a throwaway
  PostgreSQL with production's durability (``fsync``, ``synchronous_commit``, ``full_page_writes`` on; the
  test harness turns them off),
  a CHECKPOINT before each flush (so pages are logged whole once, as in the first flush after each
  checkpoint: with checkpoint_timeout 5 min and a 5-min flush schedule, every flush). First into empty
  rows (INSERTs), then the same counters again (UPDATEs: a user already flushed today). Per flush: rows/s,
  flusher CPU, PostgreSQL CPU (every process of the postmaster) and Redis CPU per row, WAL bytes per row
  (``pg_current_wal_lsn()`` delta) and table + index bytes per row (``pg_partition_tree`` sizes).

Then the capacity model (``model()``: the arithmetic is here, printed line by line) sizes a deployment of
``--pods`` pods posting ``--events-per-second`` in total from those figures and the stated assumptions.
Redis memory per item comes from benchmarks/memory.py (deterministic for a Redis build; see
docs/PERFORMANCE.md). The cluster figures (per node, 1 vs 3 shards, WAIT, concurrent shard flushes) are
benchmarks/cluster.py's; with ``--cluster FILE`` (its ``--save``) the model takes the sidecar's, the master's
and the replica's CPU per request from there. docs/SCALING.md gives the figures of a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import benchlib
import flush as flushbench
import ingest
import redis
import redis.asyncio as aioredis

from analytics_pipeline.core.config import parse_config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.postgres import connect
from analytics_pipeline.core.services import RedisServer
from analytics_pipeline.flusher.migrate import apply_schema
from analytics_pipeline.flusher.run import PipelineFlush

# Tables whose size a flush grows (the ledger and dead-letter tables are bookkeeping, a row per unit).
SIZED_TABLES = ("analytics_daily", "analytics_hourly", "analytics_user_daily", "analytics_daily_uniques",
                "analytics_user_last_seen")
QUIET_CEILING_US = 23.7  # ingest.py's ceiling, CPU us per request at c=32, 2026-11-28 (docs/PERFORMANCE.md)
# The throwaway PostgreSQL with production's durability (the tests turn these off): WAL bytes include
# full-page images, and every commit waits for its WAL flush.
PRODUCTION_POSTGRES = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
# benchmarks/memory.py, Redis 7.0.15, 2026-12-03 (docs/PERFORMANCE.md "Redis memory per event").
USER_FIELD_BYTES = 74.5
MESSAGE_ID_BYTES = 24.0
MESSAGE_ID_BYTES_WORST = 31.0  # right after a dedup level opens (docs/PERFORMANCE.md)


# ============================================================================================ sidecar
@dataclass
class SidecarFigure:
    """One (load, repetition) of the sidecar measure."""

    load: str
    per_request: int
    connections: int
    rep: int
    rps: float
    eps: float
    p50_ms: float
    sidecar_us_per_request: float
    redis_us_per_request: float
    script_us_per_commit: float  # INFO commandstats: the commit script's own time (no I/O, no event loop)
    events_per_commit: float
    verified: bool

    @property
    def sidecar_us_per_event(self) -> float:
        return self.sidecar_us_per_request / self.per_request

    @property
    def redis_us_per_event(self) -> float:
        return self.redis_us_per_request / self.per_request


def sidecar_loads(batch: int) -> list[ingest.Load]:
    return [ingest.Load("single-c1", 1, 1), ingest.Load(f"batch{batch}-c1", batch, 1),
            ingest.Load("single-c32", 1, 32), ingest.Load(f"batch{batch}-c32", batch, 32)]


def commit_stats(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of the group commit's script since the last CONFIG RESETSTAT (INFO commandstats)."""
    stats = client.info("commandstats")
    calls = usec = 0
    for name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall"):
        if name in stats:
            calls += int(stats[name]["calls"])
            usec += int(stats[name]["usec"])
    return calls, usec


def idle_cores(redis_server: RedisServer, seconds: float, log_dir: Path) -> tuple[float, float]:
    """CPU (in cores) of a started, unloaded sidecar and of its Redis over ``seconds``."""
    target = ingest.Target("sidecar", "sidecar", "uvloop")
    assert redis_server.process is not None
    with ingest.server_process(target, redis_server.url, "bench/idle", log_dir) as (pid, _port):
        time.sleep(1.0)  # start-up work done
        cpu0, redis0, t0 = benchlib.cpu_seconds(pid), benchlib.cpu_seconds(redis_server.process.pid), time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        return ((benchlib.cpu_seconds(pid) - cpu0) / wall,
                (benchlib.cpu_seconds(redis_server.process.pid) - redis0) / wall)


def measure_sidecar(args: argparse.Namespace, repeat: int, seconds: float) -> dict[str, Any]:
    """The sidecar's and Redis's CPU per request and per event, at concurrency 1 and 32; idle CPU."""
    wrk = ingest.find_wrk()
    ingest.compile_sources()
    loads = sidecar_loads(args.batch)
    target = ingest.Target("sidecar", "sidecar", "uvloop")
    figures: list[SidecarFigure] = []
    idle: list[tuple[float, float]] = []
    calibration: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as scratch:
        redis_server = RedisServer(Path(scratch) / "redis").start()
        try:
            client = redis.Redis.from_url(redis_server.url, decode_responses=True)
            print("-- sidecar: wrk in its own process; CPU of the sidecar and redis-server only "
                  f"(/proc/<pid>/stat), {seconds:g} s per run after {args.warmup:g} s warm-up, {repeat} rep(s)",
                  flush=True)
            for rep in range(1, repeat + 1):
                idle.append(idle_cores(redis_server, args.idle_seconds, Path(scratch)))
                print(f"  rep {rep} idle sidecar {idle[-1][0] * 1000:.2f} millicores, Redis "
                      f"{idle[-1][1] * 1000:.2f} millicores", flush=True)
                for load in loads:
                    client.config_resetstat()
                    run = ingest.measure(wrk, target, load, rep, redis_server, client, seconds, args.warmup, 1,
                                         Path(scratch))
                    calls, usec = commit_stats(client)
                    figure = SidecarFigure(load.name, load.per_request, load.connections, rep, run.rps, run.eps,
                                           run.p50_ms, run.cpu_us_per_request,
                                           1e6 * run.redis_cores / run.rps if run.rps else 0.0,
                                           usec / calls if calls else 0.0,
                                           run.acked_events / calls if calls else 0.0, run.verified)
                    figures.append(figure)
                    print(f"  rep {rep} {load.name:<12} {run.eps:>10,.0f} ev/s {run.rps:>8,.0f} req/s  p50 "
                          f"{run.p50_ms:6.2f} ms  sidecar {figure.sidecar_us_per_request:7.1f} us/req "
                          f"{figure.sidecar_us_per_event:6.2f} us/ev  Redis {figure.redis_us_per_request:6.1f} "
                          f"us/req {figure.redis_us_per_event:6.2f} us/ev  script {figure.script_us_per_commit:5.1f} "
                          f"us/commit of {figure.events_per_commit:5.1f} ev  "
                          f"[{'OK' if run.verified else 'FAIL: Redis does not hold what was acked'}]", flush=True)
                # Calibration: the do-nothing aiohttp server (ingest.py's ceiling) took 23.7 us/request at c=32
                # on a quiet day (docs/PERFORMANCE.md, 2026-11-28): its figure now says how busy the machine is.
                ceiling = ingest.measure(wrk, ingest.Target("ceiling", "ceiling", "uvloop"), ingest.Load(
                    "single", 1, 32), rep, redis_server, client, seconds, args.warmup, 1, Path(scratch))
                calibration.append(ceiling.cpu_us_per_request)
                print(f"  rep {rep} ceiling (do-nothing aiohttp, c=32) {ceiling.rps:>8,.0f} req/s  "
                      f"{ceiling.cpu_us_per_request:6.1f} us/req (quiet day: {QUIET_CEILING_US} us/req)", flush=True)
        finally:
            redis_server.stop()
    result: dict[str, Any] = {"idle_sidecar_cores": benchlib.stat([i[0] for i in idle]).median,
                              "idle_redis_cores": benchlib.stat([i[1] for i in idle]).median,
                              "idle_sidecar_cores_all": [i[0] for i in idle],
                              "ceiling_us_per_request_all": calibration,
                              "ceiling_us_per_request": benchlib.stat(calibration).median,
                              "batch": args.batch, "loads": {}, "runs": [asdict(f) for f in figures],
                              "verified": all(f.verified for f in figures)}
    for load in loads:
        mine = [f for f in figures if f.load == load.name]
        result["loads"][load.name] = {
            "per_request": load.per_request, "connections": load.connections,
            **{name: benchlib.stat([getattr(f, name) for f in mine]).median
               for name in ("eps", "rps", "p50_ms", "sidecar_us_per_request", "sidecar_us_per_event",
                            "redis_us_per_request", "redis_us_per_event", "script_us_per_commit",
                            "events_per_commit")},
            **{f"{name}_all": [getattr(f, name) for f in mine]
               for name in ("eps", "sidecar_us_per_event", "redis_us_per_event")}}
    return result


def show_sidecar(result: dict[str, Any]) -> None:
    runs = [SidecarFigure(**r) for r in result["runs"]]
    rows = []
    for name, load in result["loads"].items():
        mine = [r for r in runs if r.load == name]
        s = benchlib.stat
        rows.append([f"{name} ({load['per_request']} ev/req, c={load['connections']})",
                     s([r.eps for r in mine]).show(), s([r.p50_ms for r in mine]).show("{:.2f}"),
                     s([r.sidecar_us_per_request for r in mine]).show("{:.1f}"),
                     s([r.sidecar_us_per_event for r in mine]).show("{:.2f}"),
                     s([r.redis_us_per_request for r in mine]).show("{:.1f}"),
                     s([r.redis_us_per_event for r in mine]).show("{:.2f}"),
                     s([r.script_us_per_commit for r in mine]).show("{:.1f}"),
                     s([r.events_per_commit for r in mine]).show("{:.1f}"),
                     "yes" if all(r.verified for r in mine) else "NO"])
    print("Sidecar and Redis CPU per request / event (median (min..max) over repetitions):")
    print(benchlib.table(["load", "events/s", "p50 ms", "sidecar us/req", "sidecar us/ev", "Redis us/req",
                          "Redis us/ev", "script us/commit", "ev/commit", "Redis ok"], rows))
    print("  us: CPU microseconds (utime+stime from /proc of the process); script us/commit: INFO commandstats of "
          "the commit script (its run time alone, without the event loop and socket I/O Redis also spends)")
    ceiling = benchlib.stat(result["ceiling_us_per_request_all"])
    print(f"Calibration: do-nothing aiohttp server {ceiling.show('{:.1f}')} us/request at c=32; "
          f"{QUIET_CEILING_US} on a quiet day (docs/PERFORMANCE.md): this run's CPU figures are "
          f"{ceiling.median / QUIET_CEILING_US:.2f}x a quiet machine's")
    idle_all = benchlib.stat(result["idle_sidecar_cores_all"])
    print(f"Idle sidecar: {idle_all.show('{:.4f}')} cores; its Redis {result['idle_redis_cores']:.4f} cores\n")


# ============================================================================================== flush
@dataclass
class FlushFigure:
    """One flush of the flush measure."""

    kind: str  # "insert" (rows new to PostgreSQL) or "update" (the same rows flushed again)
    rep: int
    rows: int
    seconds: float
    flusher_cpu_s: float
    postgres_cpu_s: float
    redis_cpu_s: float
    wal_bytes: int
    table_bytes: int
    verified: bool

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def per_row(self, value: float) -> float:
        return value / self.rows if self.rows else 0.0


async def postmaster_pid(conn: asyncpg.Connection) -> int:
    """The postmaster's pid: the parent of our backend."""
    return parent_pid(int(await conn.fetchval("SELECT pg_backend_pid()")))


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def postgres_pids(postmaster: int) -> list[int]:
    """The postmaster and its children (backends, WAL writer, checkpointer...), from /proc."""
    found = [postmaster]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                found.append(int(entry))
    return found


def postgres_cpu(postmaster: int) -> float:
    """CPU seconds of the live PostgreSQL processes (children that exit in between are lost: none do here)."""
    total = 0.0
    for pid in postgres_pids(postmaster):
        with contextlib.suppress(OSError):
            total += benchlib.cpu_seconds(pid)
    return total


async def table_bytes(conn: asyncpg.Connection) -> int:
    """Table + index + TOAST bytes of the pipeline tables, partitions included."""
    total = 0
    for table in SIZED_TABLES:
        total += int(await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree($1::regclass)", table))
    return total


async def one_flush(kind: str, rep: int, client: aioredis.Redis, conn: asyncpg.Connection, config: Any,
                    keys: PipelineKeys, expected: flushbench.Filled, postmaster: int | None,
                    redis_pid: int) -> FlushFigure:
    """CHECKPOINT, then one flush of what is in Redis, measured; checked against ``expected``."""
    await conn.execute("CHECKPOINT")
    wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
    size0 = await table_bytes(conn)
    pg0 = postgres_cpu(postmaster) if postmaster else 0.0
    redis0, cpu0 = benchlib.cpu_seconds(redis_pid), time.process_time()
    stats = await PipelineFlush(client, conn, config, keys.pipeline).run()
    cpu1, redis1 = time.process_time(), benchlib.cpu_seconds(redis_pid)
    pg1 = postgres_cpu(postmaster) if postmaster else 0.0
    wal = int(await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal0))
    size1 = await table_bytes(conn)
    problems = [f"flush failed: {stats.error}"] if stats.error else []
    problems += await flushbench.verify(conn, client, [keys], expected)
    for problem in problems:
        print(f"      FAIL {problem}")
    return FlushFigure(kind, rep, stats.rows, stats.duration_s, cpu1 - cpu0, pg1 - pg0, redis1 - redis0, wal,
                       size1 - size0, not problems)


def show_flush_run(f: FlushFigure) -> str:
    us = 1e6
    return (f"{f.kind:<6} {f.rows:>9,} rows {f.seconds:6.2f} s {f.rows_per_s:>9,.0f} rows/s  flusher "
            f"{f.per_row(f.flusher_cpu_s) * us:5.1f} us/row  PostgreSQL "
            f"{f.per_row(f.postgres_cpu_s) * us:5.1f} us/row  "
            f"Redis {f.per_row(f.redis_cpu_s) * us:4.2f} us/row  WAL {f.per_row(f.wal_bytes):5.0f} B/row  size "
            f"+{f.per_row(f.table_bytes):4.0f} B/row  [{'OK' if f.verified else 'FAIL'}]")


async def measure_flush_async(args: argparse.Namespace, repeat: int, size: int) -> dict[str, Any]:
    figures: list[FlushFigure] = []
    with benchlib.services(args.database_url, "bench-capacity-flush-", PRODUCTION_POSTGRES) as (
            redis_server, database_url, origin):
        config = parse_config({"pipeline": "bench/capacity", "redis_url": redis_server.url,
                               "database_url": database_url})
        client = aioredis.Redis.from_url(redis_server.url)
        conn = await connect(config, "benchmark capacity")
        assert redis_server.process is not None
        try:
            # PostgreSQL's CPU is counted only on our own server (a shared one does others' work too).
            postmaster = await postmaster_pid(conn) if args.database_url is None else None
            settings = {name: await conn.fetchval(f"SHOW {name}") for name in
                        ("full_page_writes", "fsync", "synchronous_commit", "wal_level", "shared_buffers",
                         "server_version")}
            await apply_schema(conn)
            print(f"-- flush: PostgreSQL {origin}; {', '.join(f'{k}={v}' for k, v in settings.items())}; "
                  f"{size:,} counters over {flushbench.DAYS} days per flush, {repeat} rep(s)"
                  + ("" if postmaster else "; PostgreSQL CPU not measured (not a throwaway server)"), flush=True)
            for rep in range(1, repeat + 1):
                keys = PipelineKeys(f"bench/capacity-{uuid.uuid4().hex[:8]}")
                filled = await flushbench.fill(client, [keys], size, config.counters.ttl_seconds)
                figures.append(await one_flush("insert", rep, client, conn, config, keys, filled, postmaster,
                                               redis_server.process.pid))
                again = await flushbench.fill(client, [keys], size, config.counters.ttl_seconds)
                doubled = flushbench.Filled(size, filled.daily + again.daily, filled.hourly + again.hourly,
                                            filled.user_daily + again.user_daily, filled.rows)
                figures.append(await one_flush("update", rep, client, conn, config, keys, doubled, postmaster,
                                               redis_server.process.pid))
                for figure in figures[-2:]:
                    print(f"  rep {rep} {show_flush_run(figure)}", flush=True)
                await flushbench.delete_rows(conn, keys.pipeline)
                await client.delete(keys.claim_seq)
                await client.srem(PIPELINES_SET, keys.pipeline)
        finally:
            await conn.close()
            await client.aclose()
    result: dict[str, Any] = {"size": size, "settings": settings, "postgres_cpu_measured": postmaster is not None,
                              "runs": [asdict(f) for f in figures], "verified": all(f.verified for f in figures)}
    for kind in ("insert", "update"):
        mine = [f for f in figures if f.kind == kind]
        result[kind] = {
            "rows_per_s": benchlib.stat([f.rows_per_s for f in mine]).median,
            "flusher_us_per_row": benchlib.stat([f.per_row(f.flusher_cpu_s) * 1e6 for f in mine]).median,
            "postgres_us_per_row": benchlib.stat([f.per_row(f.postgres_cpu_s) * 1e6 for f in mine]).median,
            "redis_us_per_row": benchlib.stat([f.per_row(f.redis_cpu_s) * 1e6 for f in mine]).median,
            "wal_bytes_per_row": benchlib.stat([f.per_row(f.wal_bytes) for f in mine]).median,
            # The largest growth: a repetition after the first may reuse space the previous one's rows
            # left (deleted and vacuumed), so only the largest is the size of rows in new space.
            "table_bytes_per_row": max(f.per_row(f.table_bytes) for f in mine),
        }
    return result


def show_flush(result: dict[str, Any]) -> None:
    runs = [FlushFigure(**r) for r in result["runs"]]
    s = benchlib.stat
    rows = []
    for kind in ("insert", "update"):
        mine = [r for r in runs if r.kind == kind]
        rows.append([f"{kind} ({result['size']:,} rows)", s([r.rows_per_s for r in mine]).show(),
                     s([r.per_row(r.flusher_cpu_s) * 1e6 for r in mine]).show("{:.1f}"),
                     s([r.per_row(r.postgres_cpu_s) * 1e6 for r in mine]).show("{:.1f}")
                     if result["postgres_cpu_measured"] else "-",
                     s([r.per_row(r.redis_cpu_s) * 1e6 for r in mine]).show("{:.2f}"),
                     s([r.per_row(r.wal_bytes) for r in mine]).show("{:.0f}"),
                     s([r.per_row(r.table_bytes) for r in mine]).show("{:.0f}"),
                     "yes" if all(r.verified for r in mine) else "NO"])
    print("One flusher into PostgreSQL (median (min..max) over repetitions):")
    print(benchlib.table(["flush", "rows/s", "flusher us/row", "PostgreSQL us/row", "Redis us/row", "WAL B/row",
                          "size B/row", "totals exact"], rows))
    print("  WAL B/row: pg_current_wal_lsn() delta over the flush / rows, right after a CHECKPOINT, "
          f"full_page_writes={result['settings']['full_page_writes']}; size B/row: growth of table + indexes "
          "(rollups included) / rows; smaller figures: a repetition reusing the space the previous one's rows "
          "left; the model takes the largest\n")


# ============================================================================================== model
@dataclass(frozen=True)
class Assumptions:
    """What the model assumes about the workload; every one is a command-line option."""

    pods: int
    events_per_second: float
    events_per_request: int
    daily_users: int
    event_types: int
    user_types_per_day: float  # distinct event types one user sends in a day (per-user rows per user per day)
    window_active_share: float  # share of the day's users active in one flush window
    user_types_per_window: float  # distinct event types an active user sends in one flush window
    flush_interval_s: float
    redis_utilization: float  # share of a core a Redis master is planned to use
    redis_memory_gib: float  # memory planned per Redis master
    dedup_window_s: float
    message_id_share: float
    replicas: int
    wait_replicas: int


class Model:
    """The capacity model's arithmetic: each step is recorded with its formula, so the print-out explains it."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, str]] = []
        self.values: dict[str, float] = {}

    def step(self, name: str, value: float, formula: str, unit: str = "", fmt: str = "{:,.0f}") -> float:
        self.values[name] = value
        self.lines.append((name, f"{fmt.format(value)} {unit}".strip(), formula))
        return value

    def show(self) -> None:
        width = max(len(name) for name, _, _ in self.lines)
        vwidth = max(len(value) for _, value, _ in self.lines)
        for name, value, formula in self.lines:
            print(f"  {name:<{width}}  {value:>{vwidth}}   = {formula}")


def cluster_loads(cluster: dict[str, Any] | None, batch: int, wait: int) -> dict[str, dict[str, float]] | None:
    """cluster.py's concurrency-1 figures (medians) shaped like the sidecar measure's loads, or None."""
    if not cluster or "wait" not in cluster or not cluster["wait"].get("answered"):
        return None
    runs = cluster["wait"]["runs"]
    found: dict[str, dict[str, float]] = {}
    for name in ("single-c1", f"batch{batch}-c1"):
        mine = [r for r in runs if r["load"] == name and r["replicas"] == wait]
        if not mine or "replica_us_per_request" not in mine[0]:
            return None
        found[name] = {"sidecar_us_per_request": benchlib.stat([r["sidecar_us_per_request"] for r in mine]).median,
                       "redis_us_per_request": benchlib.stat([r["master_us_per_request"] for r in mine]).median,
                       "replica_us_per_request": benchlib.stat([r["replica_us_per_request"] for r in mine]).median}
    return found


def per_request_cost(loads: dict[str, Any], batch: int, events: int, field: str) -> tuple[float, str]:
    """CPU µs of one request of ``events`` events in its own group commit: straight line through the
    measured c=1 points (1 and ``batch`` events per request)."""
    one = loads["single-c1"][field]
    many = loads[f"batch{batch}-c1"][field]
    slope = (many - one) / (batch - 1)
    return one + slope * (events - 1), f"{one:.1f} + {slope:.3f} x ({events} - 1)"


def model(figures: dict[str, Any], a: Assumptions) -> Model:
    """Size a deployment from the measured figures and the assumptions."""
    m = Model()
    side, fl = figures["sidecar"], figures["flush"]
    batch = side["batch"]
    loads = side["loads"]
    cluster = cluster_loads(figures.get("cluster"), batch, a.wait_replicas)
    source = "standalone Redis, no replica (capacity.py)"
    if cluster is not None:
        # On the cluster (master + replica), in the regime of a pod: what a deployment with replicas pays.
        loads = {name: {**loads[name], **values} for name, values in cluster.items()}
        source = f"cluster master with a replica, wait_replicas {a.wait_replicas} (cluster.py)"
    # ---- sidecars
    pod_eps = m.step("events/s per pod", a.events_per_second / a.pods, "events/s / pods", "ev/s", "{:,.1f}")
    pod_rps = m.step("requests/s per pod", pod_eps / a.events_per_request, "events/s per pod / events per request",
                     "req/s", "{:,.2f}")
    m.step("ms between a pod's requests", 1000 / pod_rps, "1000 / requests/s per pod: >> the 2 ms group-commit "
           "window, so one commit per request (the measured c=1 regime)", "ms", "{:,.1f}")
    req_us, req_formula = per_request_cost(loads, batch, a.events_per_request, "sidecar_us_per_request")
    m.step("sidecar CPU per request", req_us, f"{req_formula} (sidecar us/req at c=1, measured at 1 and {batch} "
           f"events/request, straight line between; {source})", "us", "{:,.1f}")
    idle = side["idle_sidecar_cores"]
    pod_cores = m.step("sidecar cores per pod", idle + pod_rps * req_us / 1e6,
                       f"idle {idle:.4f} + requests/s per pod x CPU per request", "cores", "{:.4f}")
    m.step("sidecar cores, all pods", pod_cores * a.pods, "pods x cores per pod", "cores", "{:,.1f}")
    # ---- PostgreSQL rows (needed for the flush's share of Redis)
    rows_window = m.step("per-user rows per flush window", a.daily_users * a.window_active_share
                         * a.user_types_per_window, "daily users x active share x event types per active user",
                         "rows")
    rows_s = m.step("rows/s into PostgreSQL", rows_window / a.flush_interval_s,
                    f"per-user rows per window / {a.flush_interval_s:g} s (+ event types x 2 daily/hourly rows "
                    "per shard per window: below 1%)", "rows/s")
    # ---- Redis
    redis_req_us, redis_formula = per_request_cost(loads, batch, a.events_per_request, "redis_us_per_request")
    m.step("Redis CPU per request (one commit)", redis_req_us, f"{redis_formula} (redis-server us per c=1 "
           f"request: the commit script plus a wake-up and socket I/O per request; {source})", "us", "{:,.1f}")
    script_us, script_formula = per_request_cost(loads, batch, a.events_per_request, "script_us_per_commit")
    m.step("  the commit script alone", script_us, f"{script_formula} (INFO commandstats at c=1, standalone)", "us",
           "{:,.1f}")
    flush_us = fl["update"]["redis_us_per_row"]
    ingest_cores = a.pods * pod_rps * redis_req_us / 1e6
    redis_cores = m.step("Redis cores (masters, all)", ingest_cores + rows_s * flush_us / 1e6,
                         f"pods x req/s x Redis CPU per request ({ingest_cores:,.1f}) + rows/s x {flush_us:.2f} "
                         f"us/row of flush ({rows_s * flush_us / 1e6:,.2f})", "cores", "{:,.1f}")
    masters_cpu = math.ceil(redis_cores / a.redis_utilization)
    if cluster is not None:
        replica_us, replica_formula = per_request_cost(loads, batch, a.events_per_request, "replica_us_per_request")
        m.step("replica CPU per request", replica_us, f"{replica_formula} (the shard's replica, us per c=1 request)",
               "us", "{:,.1f}")
        m.step("Redis cores (replicas, all)", a.replicas * a.pods * pod_rps * replica_us / 1e6,
               f"{a.replicas} x pods x req/s x replica CPU per request", "cores", "{:,.1f}")
    m.step("events/s per Redis master", a.redis_utilization * 1e6 / (redis_req_us / a.events_per_request),
           f"{a.redis_utilization:g} core / ({redis_req_us:.1f} us / {a.events_per_request} events): extrapolated, "
           "this machine cannot load a Redis core (the sidecar saturates first)", "ev/s")
    m.step("  same, script time only", a.redis_utilization * 1e6 / (script_us / a.events_per_request),
           "the bound if a busy master amortised its per-request I/O fully (many clients per event-loop turn)",
           "ev/s")
    live_bytes = rows_window * USER_FIELD_BYTES * 2
    per_hour = a.events_per_second * a.message_id_share * 3600 * 1.5 * MESSAGE_ID_BYTES
    dedup_bytes = per_hour * a.dedup_window_s / 3600
    m.step("Redis memory: live per-user fields", live_bytes / 2**30,
           f"2 windows (one filling, one being flushed) x per-user rows x {USER_FIELD_BYTES} B", "GiB", "{:,.1f}")
    m.step("Redis memory: dedup per hour of window", per_hour / 2**30,
           f"events/s x {a.message_id_share:g} with message_id x 3,600 s x 1.5 (ids live 1-1.5 windows) x "
           f"{MESSAGE_ID_BYTES} B", "GiB", "{:,.1f}")
    memory = m.step("Redis memory (masters, all)", (live_bytes + dedup_bytes) / 2**30,
                    f"live + dedup per hour x {a.dedup_window_s / 3600:g} h window", "GiB", "{:,.1f}")
    masters_memory = math.ceil(memory / a.redis_memory_gib)
    masters = m.step("Redis masters", max(1, masters_cpu, masters_memory),
                     f"max(ceil(Redis cores / {a.redis_utilization:g} core planned per master) = {masters_cpu}, "
                     f"ceil(memory / {a.redis_memory_gib:g} GiB per master) = {masters_memory})")
    m.step("Redis nodes", masters * (1 + a.replicas), f"masters x (1 + {a.replicas} replica(s))")
    # ---- flushers and shards
    per_flusher = fl["update"]["rows_per_s"]
    shards = m.step("shards (counters.shards)", masters, "one per master: a shard is one hash tag, one slot, on "
                    "one master (core.keys.shard_tags spaces N shards evenly around the slot ring)")
    m.step("rows per shard per window", rows_window / shards, "per-user rows per window / shards", "rows")
    flush_time = m.step("flush time per window", rows_window / per_flusher,
                        f"per-user rows per window / {per_flusher:,.0f} rows/s: one pipeline's applies are serialized "
                        "(its advisory lock), so its shards add no PostgreSQL throughput (cluster.py flush)", "s",
                        "{:,.0f}")
    m.step("share of the flush interval", 100 * flush_time / a.flush_interval_s,
           f"flush time / {a.flush_interval_s:g} s (above 100: one pipeline cannot keep up; split it into several "
           "pipelines, whose flushes run in parallel)", "%", "{:,.0f}")
    m.step("flusher cores", rows_s * fl["update"]["flusher_us_per_row"] / 1e6,
           f"rows/s x {fl['update']['flusher_us_per_row']:.1f} us/row", "cores", "{:,.2f}")
    # ---- PostgreSQL
    if fl["postgres_cpu_measured"]:
        m.step("PostgreSQL cores (writes)", rows_s * fl["update"]["postgres_us_per_row"] / 1e6,
               f"rows/s x {fl['update']['postgres_us_per_row']:.1f} us/row (update flushes)", "cores", "{:,.2f}")
    inserts_day = m.step("per-user rows inserted per day", a.daily_users * a.user_types_per_day,
                         "daily users x distinct event types per user per day", "rows")
    rows_day = rows_s * 86400
    updates_day = m.step("rows updated per day", max(0.0, rows_day - inserts_day), "rows/s x 86,400 - inserted",
                         "rows")
    wal_day = inserts_day * fl["insert"]["wal_bytes_per_row"] + updates_day * fl["update"]["wal_bytes_per_row"]
    m.step("WAL per day", wal_day / 2**30, f"inserted x {fl['insert']['wal_bytes_per_row']:.0f} B + updated x "
           f"{fl['update']['wal_bytes_per_row']:.0f} B (WAL per row after a checkpoint)", "GiB", "{:,.0f}")
    m.step("WAL rate", wal_day / 86400 / 2**20, "WAL per day / 86,400", "MiB/s", "{:,.1f}")
    m.step("storage growth per day", inserts_day * fl["insert"]["table_bytes_per_row"] / 2**30,
           f"inserted x {fl['insert']['table_bytes_per_row']:.0f} B per row (table + indexes + rollups; updates "
           "leave dead tuples that vacuum reuses)", "GiB", "{:,.1f}")
    return m


def print_model(figures: dict[str, Any], a: Assumptions) -> None:
    print("Capacity model (arithmetic in benchmarks/capacity.py model(); assumptions are options):")
    for name, value in asdict(a).items():
        print(f"  assume {name.replace('_', ' ')}: {value:,}" if isinstance(value, int | float)
              else f"  assume {name}: {value}")
    model(figures, a).show()
    print()


# =============================================================================================== main
def assumptions(args: argparse.Namespace, events_per_request: int) -> Assumptions:
    return Assumptions(args.pods, args.events_per_second, events_per_request, args.daily_users, args.event_types,
                       args.user_types_per_day, args.window_active_share, args.user_types_per_window,
                       args.flush_interval, args.redis_utilization, args.redis_memory,
                       args.dedup_window,
                       args.message_id_share, args.replicas, args.wait_replicas)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, 2 s runs, 100k-row flushes")
    parser.add_argument("--only", help="comma-separated measures: sidecar,flush (default both)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 5; --quick 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each wrk run")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle sidecar measured for (default 10)")
    parser.add_argument("--batch", type=int, default=100, help="events per request of the batch loads (default 100)")
    parser.add_argument("--rows", type=int, help="counters per flush (default 1,000,000; --quick 100,000)")
    parser.add_argument("--database-url", help="PostgreSQL to flush into instead of a throwaway one")
    parser.add_argument("--save", metavar="FILE", help="write the measured figures as JSON")
    parser.add_argument("--model", metavar="FILE", help="measure nothing: the model from figures saved by --save")
    group = parser.add_argument_group("model assumptions")
    group.add_argument("--pods", type=int, default=10_000)
    group.add_argument("--events-per-second", type=float, default=1_000_000, help="in total, all pods")
    group.add_argument("--events-per-request", default="1,20",
                       help="comma-separated; one model per value (default 1,20: singles, SDK batches of 20)")
    group.add_argument("--daily-users", type=int, default=20_000_000)
    group.add_argument("--event-types", type=int, default=50)
    group.add_argument("--user-types-per-day", type=float, default=5.0)
    group.add_argument("--window-active-share", type=float, default=0.10,
                       help="share of the day's users active in one flush window (default 0.10)")
    group.add_argument("--user-types-per-window", type=float, default=3.0)
    group.add_argument("--flush-interval", type=float, default=300.0, help="seconds (the CronJob's 5 min)")
    group.add_argument("--redis-utilization", type=float, default=0.5,
                       help="share of a core planned per Redis master (headroom for spikes, failover, fork)")
    group.add_argument("--redis-memory", type=float, default=25.0,
                       help="GiB of data planned per Redis master (default 25: a 32 GiB node with fork headroom)")
    group.add_argument("--dedup-window", type=float, default=43_200.0,
                       help="ingest.dedup_window_seconds (default: the config's 43,200)")
    group.add_argument("--message-id-share", type=float, default=1.0,
                       help="share of events carrying a message_id (Segment/PostHog SDKs always send one)")
    group.add_argument("--replicas", type=int, default=1)
    group.add_argument("--wait-replicas", type=int, choices=(0, 1), default=0,
                       help="server.wait_replicas (with --cluster: its measured cost is used)")
    parser.add_argument("--cluster", metavar="FILE", help="figures saved by cluster.py --save: the model then takes "
                                                          "the sidecar's and Redis's CPU per request on a cluster "
                                                          "master with a replica (and the replica's)")
    args = parser.parse_args()
    per_request = [int(n) for n in args.events_per_request.split(",")]

    if args.model:
        figures = json.loads(Path(args.model).read_text())
        if args.cluster:
            figures["cluster"] = json.loads(Path(args.cluster).read_text())
        print(f"== capacity model from {args.model} (measured {figures['date']} on {figures['machine']})\n")
        for value in per_request:
            print_model(figures, assumptions(args, value))
        return 0

    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    size = args.rows or (100_000 if args.quick else 1_000_000)
    only = set((args.only or "sidecar,flush").split(","))
    benchlib.print_header("capacity benchmark")
    figures: dict[str, Any] = {"date": benchlib.machine_lines()[0].split(None, 1)[1],
                               "machine": benchlib.machine_lines()[1].split(None, 1)[1],
                               "load_avg_start": benchlib.load_average(), "command": benchlib.rerun_command()}
    ok = True
    if "sidecar" in only:
        figures["sidecar"] = measure_sidecar(args, repeat, seconds)
        ok &= figures["sidecar"]["verified"]
    if "flush" in only:
        figures["flush"] = asyncio.run(measure_flush_async(args, repeat, size))
        ok &= figures["flush"]["verified"]
    figures["load_avg_end"] = benchlib.load_average()
    print(f"\nload avg at start {figures['load_avg_start']}, at end {figures['load_avg_end']}\n")
    if "sidecar" in figures:
        show_sidecar(figures["sidecar"])
    if "flush" in figures:
        show_flush(figures["flush"])
    if args.save:
        Path(args.save).write_text(json.dumps(figures, indent=1))
        print(f"figures saved to {args.save}\n")
    if args.cluster:
        figures["cluster"] = json.loads(Path(args.cluster).read_text())
    if "sidecar" in figures and "flush" in figures:
        for value in per_request:
            print_model(figures, assumptions(args, value))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
