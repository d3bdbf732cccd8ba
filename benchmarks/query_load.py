"""Query-under-load benchmark (issue 11, case 4): do heavy reads stall ingest?

    .venv/bin/python benchmarks/query_load.py              # 300,000 users, 8 query clients, 10 s per phase
    .venv/bin/python benchmarks/query_load.py --quick      # 30,000 users, 3 s per phase
    .venv/bin/python benchmarks/query_load.py --sidecar OTHER/.venv/bin/analytics-pipeline   # another checkout

A throwaway Redis (its SLOWLOG records every call over 100 µs) and PostgreSQL (throwaway unless
``--database-url``) hold one pipeline whose live per-user bucket of today has ``--users`` users (4
event types, one field each, like the sidecar writes them), with today's daily and hourly buckets.
Two real sidecar processes run against them: one takes ingest, one answers queries (as when other
pods' dashboards or API clients read while this pod ingests). Then, for ``--seconds`` each:

1. **idle**: one client posts single events to the ingest sidecar back to back (latency of each 202),
   and a second connection PINGs Redis every 5 ms (what any other client of that Redis sees);
2. **load**: the same, while ``--clients`` clients hammer the query sidecar with per-user counts
   (``/v1/counts?user_id=``, a random user) and uniques (``/v1/uniques``), 50/50, back to back
   (after a 429 they pause 50 ms);
3. **load, same sidecar**: the same, but the queries go to the ingest sidecar itself.

Printed: ingest and PING p50/p99/max per phase and the load/idle p99 ratio (target <= 2x), the
slowest Redis calls of each load phase from SLOWLOG (execution time inside Redis, i.e. how long
every other client waited; target <= 10 ms; commands inside MULTI/EXEC are logged one by one),
query answers per status and their latency. Then the answers are checked (uniques = users + the
probe's one user, a user's count exact). Figures only: nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import asyncpg
import benchlib
import redis

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, user_field
from analytics_pipeline.core.services import free_port
from analytics_pipeline.flusher.migrate import apply_schema

PIPELINE = "bench/query-load"
EVENT_TYPES = 4
SLOWLOG_US = 100
QUERY_PAUSE_AFTER_429_S = 0.05


def user_name(number: int) -> str:
    return f"user-{number:06d}"


def event_name(number: int) -> str:
    return f"event_{number % EVENT_TYPES}"


# ------------------------------------------------------------------------------------------- data
def fill(client: redis.Redis, users: int, now: datetime) -> None:
    """Today's live buckets as the sidecar writes them: ``users`` per-user fields, daily and hourly totals."""
    keys = PipelineKeys(PIPELINE)
    user_key, daily, hourly = keys.user_daily(now), keys.daily(now), keys.hourly(now)
    totals: Counter[str] = Counter()
    pipe = client.pipeline(transaction=False)
    for start in range(0, users, 10_000):
        fields = {}
        for n in range(start, min(start + 10_000, users)):
            fields[user_field(event_name(n), user_name(n))] = 1
            totals[event_name(n)] += 1
        pipe.hset(user_key, mapping=fields)
    pipe.hset(daily, mapping=dict(totals))
    pipe.hset(hourly, mapping=dict(totals))
    for key in (user_key, daily, hourly):
        pipe.expire(key, 7 * 86400)
        pipe.zadd(keys.dirty, {key: int(time.time() * 1000)}, nx=True)
    pipe.sadd(PIPELINES_SET, PIPELINE)
    pipe.execute()


# ---------------------------------------------------------------------------------------- sidecars
@contextmanager
def sidecar(command: str, redis_url: str, database_url: str, log_dir: Path, name: str) -> Iterator[tuple[int, int]]:
    """A real sidecar process (``command sidecar ...``) on a free port; yields (port, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ANALYTICS_CONFIG", "PYTHONPATH")}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, ANALYTICS_PIPELINE=PIPELINE, PYTHONSAFEPATH="1")
    log_path = log_dir / f"{name}.log"
    with benchlib.served([command, "sidecar", "--port", str(port), "--no-reload", "--log-level", "warning"],
                         env=env, port=port, what=f"sidecar {name}", log_path=log_path, cwd=log_dir) as process:
        yield port, process.pid


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def postmaster_pid(port: int) -> int | None:
    """The pid of the PostgreSQL server listening on ``port`` (its command line carries ``-p port``)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"postgres") and any(
                a == b"-p" and b == str(port).encode() for a, b in itertools.pairwise(args)):
            return int(cmdline.parent.name)
    return None


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of a process and of its descendants to one CPU (processes forked later inherit it)."""
    for each in [pid, *_children(pid)]:
        for task in Path(f"/proc/{each}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), {cpu})
            except (ProcessLookupError, ValueError):
                pass
        if each != pid:
            pin(each, cpu)


# ------------------------------------------------------------------------------------------ probes
async def probe(ingest_port: int, redis_url: str, seconds: float) -> dict[str, Any]:
    """Single-event ingest latencies (back to back) and Redis PING latencies (every 5 ms) for ``seconds``."""
    ingest: list[float] = []
    pings: list[float] = []
    statuses: Counter[int] = Counter()
    deadline = time.perf_counter() + seconds
    body = json.dumps({"event": "probe", "user_id": "probe-user"}).encode()

    async def post_loop(session: aiohttp.ClientSession) -> None:
        url = f"http://127.0.0.1:{ingest_port}/v1/events"
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                await response.read()
                statuses[response.status] += 1
            ingest.append(time.perf_counter() - started)

    async def ping_loop() -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        try:
            await client.ping()
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await client.ping()
                pings.append(time.perf_counter() - started)
                await asyncio.sleep(0.005)
        finally:
            await client.aclose()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(post_loop(session), ping_loop())
    return {"ingest": ingest, "ping": pings, "statuses": dict(statuses)}


def hammer_main(port: int, seconds: float, clients: int, users: int) -> None:
    """The query load (run in its own process): ``clients`` clients, per-user counts and uniques 50/50."""
    latencies: dict[str, list[float]] = {"counts?user_id": [], "uniques": []}
    statuses: Counter[str] = Counter()

    async def client(seed: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(seed)
        deadline = time.perf_counter() + seconds
        base = f"http://127.0.0.1:{port}"
        while time.perf_counter() < deadline:
            if rng.random() < 0.5:
                kind, url = "counts?user_id", f"{base}/v1/counts?user_id={user_name(rng.randrange(users))}"
            else:
                kind, url = "uniques", f"{base}/v1/uniques"
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                status = response.status
            statuses[f"{kind} {status}"] += 1
            if status == 200:
                latencies[kind].append(time.perf_counter() - started)
            elif status in (429, 503):
                await asyncio.sleep(QUERY_PAUSE_AFTER_429_S)

    async def run() -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=clients)) as session:
            await asyncio.gather(*(client(seed, session) for seed in range(clients)))

    asyncio.run(run())
    print(json.dumps({"latencies": latencies, "statuses": dict(statuses)}))


# ------------------------------------------------------------------------------------------ figures
def ms(values: list[float], pct: float) -> str:
    return f"{benchlib.percentile(values, pct) * 1000:.2f}" if values else "-"


def slowlog_since(client: redis.Redis) -> list[dict[str, Any]]:
    entries = client.slowlog_get(100_000)
    client.slowlog_reset()
    return entries


def slowest(entries: list[dict[str, Any]], top: int = 5) -> list[list[str]]:
    rows = []
    for entry in sorted(entries, key=lambda e: -e["duration"])[:top]:
        command = entry["command"]
        text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
        rows.append([f"{entry['duration'] / 1000:.2f}", text[:90]])
    return rows


# What the query path sends (ingest sends EVALSHA; its group-commit fence SET and readiness checks
# the rest): the rows of the per-command table that answer "does a read hold Redis?".
QUERY_COMMANDS = ("HSCAN", "HMGET", "HGET", "HKEYS", "HVALS", "HGETALL", "GET", "ZRANGE")


def per_command(entries: list[dict[str, Any]]) -> dict[str, list[int]]:
    """SLOWLOG durations (µs) per command name, slowest command first."""
    found: dict[str, list[int]] = {}
    for entry in entries:
        command = entry["command"]
        name = (command.decode(errors="replace") if isinstance(command, bytes) else str(command)).split(" ")[0].upper()
        found.setdefault(name, []).append(entry["duration"])
    return dict(sorted(found.items(), key=lambda item: -max(item[1])))


async def check_answers(port: int, users: int) -> list[str]:
    async with aiohttp.ClientSession() as session:
        async def get(path: str) -> Any:
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                return response.status, await response.json()

        today = datetime.now(UTC).date().isoformat()
        status, uniques = await get(f"/v1/uniques?from={today}&to={today}")
        status_user, mine = await get(f"/v1/counts?user_id={user_name(users // 3)}&from={today}&to={today}")
    return [benchlib.check(status == 200 and uniques["distinct_total"] == users + 1,
                           f"uniques today = {uniques.get('distinct_total')} (want {users + 1}: users + the probe)"),
            benchlib.check(status_user == 200 and mine["total"] == 1,
                           f"counts of {user_name(users // 3)} today = {mine.get('total')} (want 1)")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=300_000, help="users in today's live per-user bucket")
    parser.add_argument("--clients", type=int, default=8, help="concurrent query clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--quick", action="store_true", help="30,000 users, 3 s per phase")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument("--sidecar", default=str(Path(sys.executable).parent / "analytics-pipeline"),
                        help="the analytics-pipeline command to run the sidecars with (another checkout's venv "
                             "measures that code)")
    parser.add_argument("--pin", action="store_true",
                        help="CPU 0: Redis, the ingest sidecar and the probe; CPU 1: the query sidecar, the query "
                             "clients and PostgreSQL (as when the reading pod and the database run on other "
                             "nodes: on 2 cores the query load otherwise takes the ingest path's CPU)")
    parser.add_argument("--hammer", nargs=4, metavar=("PORT", "SECONDS", "CLIENTS", "USERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hammer:
        port, seconds, clients, users = args.hammer
        hammer_main(int(port), float(seconds), int(clients), int(users))
        return 0
    if args.quick:
        args.users, args.seconds = 30_000, 3.0

    with benchlib.services(args.database_url, "bench-query-load-") as (redis_server, database_url, origin):
        client = redis.Redis.from_url(redis_server.url)
        # throwaway server: record every call over SLOWLOG_US
        client.config_set("slowlog-log-slower-than", SLOWLOG_US)
        client.config_set("slowlog-max-len", 100_000)

        async def prepare() -> None:
            conn = await asyncpg.connect(database_url)
            try:
                await apply_schema(conn)
                await benchlib.print_services_header("query under load", client_async, conn, origin)
            finally:
                await conn.close()

        import redis.asyncio as aioredis

        client_async = aioredis.Redis.from_url(redis_server.url)
        asyncio.run(prepare())
        print(f"sidecar command: {args.sidecar}")
        started = time.perf_counter()
        fill(client, args.users, datetime.now(UTC))
        print(f"filled today's per-user bucket with {args.users:,} users in {time.perf_counter() - started:.1f} s "
              f"({client.info('memory')['used_memory_human']} used)\n", flush=True)

        log_dir = Path(redis_server.directory).parent
        results: dict[str, dict[str, Any]] = {}
        slow: dict[str, list[dict[str, Any]]] = {}
        queries: dict[str, dict[str, Any]] = {}
        with sidecar(args.sidecar, redis_server.url, database_url, log_dir, "ingest") as (ingest_port, ingest_pid), \
                sidecar(args.sidecar, redis_server.url, database_url, log_dir, "query") as (query_port, query_pid):
            if args.pin:
                postmaster = postmaster_pid(urlparse(database_url).port or 5432)
                for pid, cpu in ((redis_server.process.pid, 0), (ingest_pid, 0), (os.getpid(), 0), (query_pid, 1)):
                    pin(pid, cpu)
                if postmaster is not None:
                    pin(postmaster, 1)
                print(f"pinned: CPU 0 Redis, ingest sidecar, probe; CPU 1 query sidecar, query clients"
                      f"{', PostgreSQL' if postmaster else ' (PostgreSQL not found on this machine: not pinned)'}")
            for phase, target in (("idle", None), ("load: other sidecar", query_port),
                                  ("load: same sidecar", ingest_port)):
                slowlog_since(client)
                hammer = None
                if target is not None:
                    hammer = subprocess.Popen([sys.executable, __file__, "--hammer", str(target), str(args.seconds),
                                               str(args.clients), str(args.users)], stdout=subprocess.PIPE, text=True)
                    if args.pin:
                        pin(hammer.pid, 1)
                    time.sleep(0.5)  # the clients are connected and busy before the probe starts
                results[phase] = asyncio.run(probe(ingest_port, redis_server.url, args.seconds))
                slow[phase] = slowlog_since(client)
                if hammer is not None:
                    out, _ = hammer.communicate(timeout=300)
                    queries[phase] = json.loads(out.strip().splitlines()[-1])
                print(f"phase '{phase}' done", flush=True)
            checks = asyncio.run(check_answers(query_port, args.users))

        idle_p99 = benchlib.percentile(results["idle"]["ingest"], 99)
        rows = []
        for phase, result in results.items():
            p99 = benchlib.percentile(result["ingest"], 99)
            rows.append([phase, f"{len(result['ingest']):,}", ms(result["ingest"], 50), ms(result["ingest"], 99),
                         ms(result["ingest"], 100), f"{p99 / idle_p99:.2f}x", ms(result["ping"], 50),
                         ms(result["ping"], 99), ms(result["ping"], 100),
                         " ".join(f"{k}:{v}" for k, v in sorted(result["statuses"].items()))])
        print()
        print(benchlib.table(["phase", "ingest n", "ingest p50 ms", "p99 ms", "max ms", "p99 / idle",
                              "PING p50 ms", "p99 ms", "max ms", "ingest statuses"], rows))
        print(f"\nRedis calls over {SLOWLOG_US} µs (SLOWLOG: time inside Redis, when every other client waits), "
              "per command: count, p50 / p99 / max ms")
        rows = []
        for phase, entries in slow.items():
            for name, durations in per_command(entries).items():
                part = "query path" if name in QUERY_COMMANDS else "ingest, other"
                values = [d / 1e6 for d in durations]
                rows.append([phase, name, part, f"{len(values):,}", ms(values, 50), ms(values, 99), ms(values, 100)])
        print(benchlib.table(["phase", "command", "sent by", "calls", "p50 ms", "p99 ms", "max ms"], rows))
        for phase, entries in slow.items():
            print(f"slowest calls, {phase}:")
            for duration, text in slowest(entries, 3):
                print(f"   {duration:>8} ms  {text}")
        for phase, load in queries.items():
            print(f"\nqueries, {phase}: " + ", ".join(f"{k}: {v}" for k, v in sorted(load["statuses"].items())))
            for kind, values in load["latencies"].items():
                print(f"   {kind:16} answered 200: {len(values):5}  p50 {ms(values, 50)} ms  p99 {ms(values, 99)} ms")
        print()
        for line in checks:
            print(line)
        client.close()
        return 0 if all(line.startswith("OK") for line in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
