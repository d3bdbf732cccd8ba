"""Cluster figures: Redis CPU per event per node with 1 and 3 shards, the cost of WAIT, concurrent shard flushes.

    .venv/bin/python benchmarks/cluster.py                   # 3 repetitions (~6 min)
    .venv/bin/python benchmarks/cluster.py --quick           # 1 repetition, 2 s runs, 50k-row flushes (~1.5 min)
    .venv/bin/python benchmarks/cluster.py --only spread     # or: wait, flush

A real Redis Cluster of 3 masters and 3 replicas on loopback (core.services.RedisClusterServers:
``redis-server --cluster-enabled yes`` x 6, ``redis-cli --cluster create --cluster-replicas 1``).
Sidecars are the real ``analytics-pipeline sidecar`` processes, given the URL of one node (any node
will do) and a config file with ``counters.shards``; each is loaded by its own ``wrk`` (ingest.py's
loads and Lua). CPU is utime+stime from /proc/<pid>/stat of every redis-server and sidecar.

- ``spread``: 3 sidecars (POD_NAME chosen so that with 3 shards each writes a different shard),
  loaded at once, with ``counters.shards`` 1 and then 3: events/s in total and, per node, CPU cores,
  CPU per event (node CPU / all events) and its share of the cluster's Redis CPU. This machine has 2
  cores for 6 Redis nodes, 3 sidecars and 3 wrk: the point is where the load goes (one master, or split
  evenly over three), not a speed-up the cores cannot give. Redis must hold every acked event.
- ``wait``: one sidecar, one shard, ``server.wait_replicas`` 0 then 1: latency, events/s, CPU per request of
  the sidecar, the shard's master and its replica, at concurrency 1 (every request its own commit, so its
  own WAIT: a pod's regime; capacity.py's model takes these with ``--cluster FILE``) and 32, single events
  and batches.
  WAIT calls are read from the master's INFO commandstats (0 calls: the figure is not reported).
- ``flush``: ``--rows`` counters (flush.py's fill: 7 days, users split over the shards) in 1 and then 3
  shards, flushed by one ``analytics-pipeline flush`` process (the CronJob's command, config
  ``counters.shards``; ``flush.shard_concurrency`` 3: all at once, and 1: one after the other) into a
  throwaway PostgreSQL with production's durability (fsync, synchronous_commit, full_page_writes on):
  rows/s in all and per shard; PostgreSQL totals checked. (benchmarks/flush.py --shards measures the
  same on a single Redis, in-process.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchlib
import flush as flushbench
import ingest
import redis
import yaml

from analytics_pipeline.core.keys import PipelineKeys, shard_tags, sidecar_shard_tag
from analytics_pipeline.core.services import PostgresServer, RedisClusterServers, free_port

SIDECARS = 3
# (shards, flush.shard_concurrency) of the flush measure: 1 shard; 3 at once; 3 one after the other.
FLUSH_CASES = [(1, 1), (3, 3), (3, 1)]
PRODUCTION_POSTGRES = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}


# ------------------------------------------------------------------------------------------ helpers
def write_config(folder: Path, name: str, **changes: dict[str, Any]) -> Path:
    """benchmarks/baseline/sidecar.yaml with ``changes`` merged per section, written to ``folder/name``."""
    config = yaml.safe_load(ingest.SIDECAR_CONFIG.read_text())
    for section, values in changes.items():
        config.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def pod_names(pipeline: str, shards: int, count: int) -> list[str]:
    """``count`` pod names whose sidecars write to different shards (as many as there are), stable per pipeline."""
    chosen: list[str] = []
    seen: set[str] = set()
    for number in range(1000):
        name = f"pod-{number}"
        tag = sidecar_shard_tag(pipeline, shards, name)
        if tag not in seen or len(seen) == shards:
            chosen.append(name)
            seen.add(tag)
        if len(chosen) == count:
            return chosen
    raise RuntimeError("no pod names found")


@contextlib.contextmanager
def sidecar(config: Path, redis_url: str, pipeline: str, pod: str, log_dir: Path) -> Iterator[tuple[int, int]]:
    """The real sidecar process (as ingest.py starts it) with ``config``, REDIS_URL and POD_NAME; (pid, port)."""
    port = free_port()
    console = Path(sys.executable).parent / "analytics-pipeline"
    base = [str(console)] if console.exists() else [sys.executable, "-m", "analytics_pipeline.main"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANALYTICS_CONFIG", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "DATABASE_URL")}
    env.update(REDIS_URL=redis_url, ANALYTICS_PIPELINE=pipeline, POD_NAME=pod)
    log_path = log_dir / f"sidecar-{pod}-{port}.log"
    command = [*base, "sidecar", "--config", str(config), "--port", str(port), "--no-reload", "--event-loop", "auto",
               "--log-level", "warning"]
    with benchlib.served(command, env=env, port=port, what=f"sidecar {pod}", log_path=log_path) as process:
        yield process.pid, port


def node_cpu(cluster: RedisClusterServers) -> dict[int, float]:
    """CPU seconds so far of every live redis-server of the cluster, by port."""
    return {node.port: benchlib.cpu_seconds(node.process.pid) for node in cluster.nodes if node.process}


def stored_events(cluster: RedisClusterServers, pipeline: str, shards: int) -> tuple[dict[str, int], bool]:
    """Events each shard of the pipeline holds today (daily buckets), by tag, and whether daily == hourly ==
    per-user sums."""
    client = redis.RedisCluster.from_url(cluster.url, decode_responses=True)
    try:
        by_tag: dict[str, int] = {}
        sums = {"h": 0, "u": 0}
        now = datetime.now(UTC)
        for tag in shard_tags(pipeline, shards):
            keys = PipelineKeys.of_tag(tag)
            by_tag[tag] = sum(int(v) for v in client.hvals(keys.daily(now)))
            for hour in range(now.hour + 1):
                sums["h"] += sum(int(v) for v in client.hvals(keys.hourly(now.replace(hour=hour))))
            sums["u"] += sum(int(v) for v in client.hvals(keys.user_daily(now)))
        total = sum(by_tag.values())
        return by_tag, total == sums["h"] == sums["u"]
    finally:
        client.close()


def masters_by_port(cluster: RedisClusterServers) -> dict[int, str]:
    """Role of each node ('master 0-5460' or 'replica of <port>'), by port."""
    nodes = cluster.cluster_nodes()
    port_of = {n["id"]: n["port"] for n in nodes}
    roles = {}
    for n in nodes:
        if n["role"] == "master":
            ranges = ",".join(f"{lo}-{hi}" for lo, hi in n["slots"])  # type: ignore[attr-defined]
            roles[int(n["port"])] = f"master {ranges}"  # type: ignore[call-overload]
        else:
            roles[int(n["port"])] = f"replica of {port_of.get(n['master'], '?')}"  # type: ignore[call-overload]
    return roles


# ------------------------------------------------------------------------------------------ spread
@dataclass
class SpreadRun:
    shards: int
    load: str
    rep: int
    eps: float
    acked: int  # in the measured run (CPU per event is over it)
    sent: int  # warm-up included, like stored
    stored: int
    consistent: bool  # acked (warm-up included) <= stored <= sent, and the granularities agree
    errors: int
    node_cores: dict[int, float]
    sidecar_cores: float
    wall: float
    shard_owner: dict[str, int] = field(default_factory=dict)  # shard tag -> port of its master
    shard_share: dict[str, float] = field(default_factory=dict)  # shard tag -> its share of the events

    def us_per_event(self, port: int) -> float:
        """The node's CPU per event of all events written in the run."""
        return 1e6 * self.node_cores[port] * self.wall / self.acked if self.acked else 0.0


def spread_run(cluster: RedisClusterServers, wrk: str, shards: int, load: ingest.Load, rep: int, seconds: float,
               warmup: float, scratch: Path) -> SpreadRun:
    """3 sidecars of one pipeline with ``shards`` shards, each loaded by its own wrk at once."""
    pipeline = f"bench/spread-{shards}-{load.name}-{rep}-{uuid.uuid4().hex[:6]}"
    config = write_config(scratch, f"spread-{shards}.yaml", counters={"shards": shards})
    pods = pod_names(pipeline, shards, SIDECARS)
    owners = {tag: int(cluster.owner_of_slot(PipelineKeys.of_tag(tag).slot)["port"])  # type: ignore[call-overload]
              for tag in shard_tags(pipeline, shards)}
    with contextlib.ExitStack() as stack:
        started = [stack.enter_context(sidecar(config, cluster.url, pipeline, pod, scratch)) for pod in pods]
        urls = [f"http://127.0.0.1:{port}" for _, port in started]
        with ThreadPoolExecutor(len(urls)) as pool:
            if warmup > 0:
                warm = list(pool.map(lambda url: ingest.run_wrk(wrk, url, load, warmup, 1)[0], urls))
            else:
                warm = []
            time.sleep(0.2)
            cpu0, side0, t0 = node_cpu(cluster), [benchlib.cpu_seconds(pid) for pid, _ in started], time.monotonic()
            summaries = list(pool.map(lambda url: ingest.run_wrk(wrk, url, load, seconds, 1)[0], urls))
            wall = time.monotonic() - t0
            cpu1, side1 = node_cpu(cluster), [benchlib.cpu_seconds(pid) for pid, _ in started]
    acked = sum((s["requests"] - s["status_errors"]) for s in summaries + warm) * load.per_request
    sent = sum(s["sent"] for s in summaries + warm) * load.per_request
    measured_acked = sum((s["requests"] - s["status_errors"]) for s in summaries) * load.per_request
    errors = sum(int(s["status_errors"] + s["connect_errors"] + s["read_errors"] + s["timeouts"]) for s in summaries)
    by_tag, same = stored_events(cluster, pipeline, shards)
    stored = sum(by_tag.values())
    # Redis must hold every event acked (warm-up included) and no more than was sent.
    consistent = same and acked > 0 and acked <= stored <= sent
    return SpreadRun(shards, load.name, rep, measured_acked / wall, measured_acked, sent, stored, consistent, errors,
                     {port: (cpu1[port] - cpu0[port]) / wall for port in cpu1},
                     sum(b - a for a, b in zip(side0, side1, strict=True)) / wall, wall, owners,
                     {tag: count / stored if stored else 0.0 for tag, count in by_tag.items()})


def measure_spread(cluster: RedisClusterServers, args: argparse.Namespace, repeat: int, seconds: float,
                   scratch: Path) -> dict[str, Any]:
    wrk = ingest.find_wrk()
    loads = [ingest.Load("single-c8", 1, 8), ingest.Load(f"batch{args.batch}-c8", args.batch, 8)]
    roles = masters_by_port(cluster)
    cpu0, t0 = node_cpu(cluster), time.monotonic()
    time.sleep(5.0)  # what the nodes burn with no load (cluster bus, replication pings, cron)
    cpu1, wall = node_cpu(cluster), time.monotonic() - t0
    idle = {str(port): (cpu1[port] - cpu0[port]) / wall for port in cpu1}
    runs: list[SpreadRun] = []
    print(f"-- spread: {SIDECARS} sidecars at once, each with its own wrk; shards 1 and 3; {seconds:g} s runs, "
          f"{repeat} rep(s)", flush=True)
    for rep in range(1, repeat + 1):
        for load in loads:
            for shards in (1, 3):
                run = spread_run(cluster, wrk, shards, load, rep, seconds, args.warmup, scratch)
                runs.append(run)
                masters = [p for p in sorted(run.node_cores) if roles[p].startswith("master")]
                per_master = "  ".join(f"{p}: {run.node_cores[p]:.2f} cores {run.us_per_event(p):5.2f} us/ev"
                                       for p in masters)
                print(f"  rep {rep} {load.name:<12} shards {shards}: {run.eps:>9,.0f} ev/s  sidecars "
                      f"{run.sidecar_cores:.2f} cores  masters {per_master}  errors {run.errors}  "
                      f"[{'OK' if run.consistent else 'FAIL: Redis does not hold what was acked'}]", flush=True)
    return {"roles": {str(k): v for k, v in roles.items()}, "idle_cores": idle, "runs": [run_dict(r) for r in runs],
            "verified": all(r.consistent for r in runs)}


def run_dict(run: SpreadRun) -> dict[str, Any]:
    data = run.__dict__.copy()
    data["node_cores"] = {str(k): v for k, v in run.node_cores.items()}
    return data


def own_share(run: dict[str, Any], port: int, roles: dict[int, str]) -> float:
    """Share of the run's events that node ``port`` holds: its shards' (a master) or its master's (a replica)."""
    role = roles[port]
    master = int(role.rsplit(" ", 1)[1]) if role.startswith("replica of ") else port
    return sum(share for tag, share in run["shard_share"].items() if run["shard_owner"][tag] == master)


def node_labels(run: dict[str, Any], roles: dict[int, str]) -> dict[int, str]:
    """'master A'..'master C' by the share of the run's events they hold (then port), 'replica of A'..."""
    masters = sorted((port for port in roles if roles[port].startswith("master")),
                     key=lambda port: (-own_share(run, port, roles), port))
    letter = {port: "ABCDEFGH"[i] for i, port in enumerate(masters)}
    labels = {port: f"master {letter[port]}" for port in masters}
    for port, role in roles.items():
        if role.startswith("replica of "):
            labels[port] = f"replica of {letter.get(int(role.rsplit(' ', 1)[1]), '?')}"
    return labels


def show_spread(result: dict[str, Any]) -> None:
    roles = {int(k): v for k, v in result["roles"].items()}
    runs = result["runs"]
    s = benchlib.stat
    print("3 sidecars loaded at once, 1 vs 3 shards (median (min..max) over repetitions):")
    rows = []
    for load in dict.fromkeys(r["load"] for r in runs):
        for shards in (1, 3):
            mine = [r for r in runs if r["load"] == load and r["shards"] == shards]
            if not mine:
                continue
            total = [sum(r["node_cores"].values()) for r in mine]
            rows.append([f"{load}, {shards} shard(s)", s([r["eps"] for r in mine]).show(),
                         s([r["sidecar_cores"] for r in mine]).show("{:.2f}"), s(total).show("{:.2f}"),
                         s([1e6 * t * r["wall"] / r["acked"] for r, t in zip(mine, total, strict=True)]).show("{:.2f}"),
                         "yes" if all(r["consistent"] for r in mine) else "NO"])
    print(benchlib.table(["load, shards", "events/s", "sidecars cores", "Redis cores (6 nodes)",
                          "Redis us/event (6 nodes)", "Redis ok"], rows))
    print("\nPer node: CPU, its share of the cluster's Redis CPU, its share of the events (a master: its shards'; "
          "a replica: its master's) and CPU us per event it holds. Masters are named by the events they hold (A: "
          "most), as each run's pipeline lands on its own slots:")
    rows = []
    for load in dict.fromkeys(r["load"] for r in runs):
        for shards in (1, 3):
            mine = [r for r in runs if r["load"] == load and r["shards"] == shards]
            per_label: dict[str, list[tuple[float, float, float, float]]] = {}
            for r in mine:
                total = sum(r["node_cores"].values())
                for port, label in node_labels(r, roles).items():
                    cores = r["node_cores"][str(port)]
                    events = own_share(r, port, roles)
                    own = 1e6 * cores * r["wall"] / (r["acked"] * events) if events > 0 and r["acked"] else -1.0
                    per_label.setdefault(label, []).append((cores, 100 * cores / total if total else 0.0,
                                                            100 * events, own))
            for label in sorted(per_label, key=lambda x: (x.startswith("replica"), x)):
                values = per_label[label]
                own_values = [v[3] for v in values if v[3] >= 0]
                rows.append([f"{load}, {shards} shard(s)", label, s([v[0] for v in values]).show("{:.3f}"),
                             f"{s([v[1] for v in values]).median:.0f}%", f"{s([v[2] for v in values]).median:.0f}%",
                             s(own_values).show("{:.2f}") if own_values else "-"])
    print(benchlib.table(["load, shards", "node", "cores", "share of Redis CPU", "share of events",
                          "us per event held"], rows))
    idle = result.get("idle_cores", {})
    if idle:
        print("  idle cluster before the runs (cores): " + ", ".join(f"{port} {cores:.3f}"
                                                               for port, cores in sorted(idle.items())))
    print()


# -------------------------------------------------------------------------------------------- wait
def measure_wait(cluster: RedisClusterServers, args: argparse.Namespace, repeat: int, seconds: float,
                 scratch: Path) -> dict[str, Any]:
    wrk = ingest.find_wrk()
    loads = [ingest.Load("single-c1", 1, 1), ingest.Load(f"batch{args.batch}-c1", args.batch, 1),
             ingest.Load("single-c32", 1, 32), ingest.Load(f"batch{args.batch}-c32", args.batch, 32)]
    runs: list[dict[str, Any]] = []
    replica_of = {int(n["port"]): next(int(r["port"]) for r in cluster.cluster_nodes()  # type: ignore[call-overload]
                                       if r["master"] == n["id"])
                  for n in cluster.cluster_nodes() if n["role"] == "master"}
    print(f"-- wait: one sidecar, one shard, server.wait_replicas 0 and 1; {seconds:g} s runs, {repeat} rep(s)",
          flush=True)
    for rep in range(1, repeat + 1):
        for load in loads:
            for replicas in (0, 1):
                pipeline = f"bench/wait-{replicas}-{load.name}-{rep}-{uuid.uuid4().hex[:6]}"
                config = write_config(scratch, f"wait-{replicas}.yaml",
                                      server={"wait_replicas": replicas, "wait_replicas_timeout_seconds": 1.0})
                owner = int(cluster.owner_of_slot(PipelineKeys(pipeline).slot)["port"])  # type: ignore[call-overload]
                master = redis.Redis(host="127.0.0.1", port=owner, decode_responses=True)
                master_pid = cluster.node(owner).process.pid  # type: ignore[union-attr]
                replica_pid = cluster.node(replica_of[owner]).process.pid  # type: ignore[union-attr]
                with sidecar(config, cluster.url, pipeline, "pod-0", scratch) as (pid, port):
                    url = f"http://127.0.0.1:{port}"
                    if args.warmup > 0:
                        ingest.run_wrk(wrk, url, load, args.warmup, 1)
                    master.config_resetstat()
                    cpu0, m0, t0 = benchlib.cpu_seconds(pid), benchlib.cpu_seconds(master_pid), time.monotonic()
                    r0 = benchlib.cpu_seconds(replica_pid)
                    summary, _ = ingest.run_wrk(wrk, url, load, seconds, 1)
                    wall = time.monotonic() - t0
                    cpu1, m1, r1 = (benchlib.cpu_seconds(pid), benchlib.cpu_seconds(master_pid),
                                    benchlib.cpu_seconds(replica_pid))
                    stats = master.info("commandstats")
                master.close()
                requests = summary["requests"] - summary["status_errors"]
                waits = int(stats.get("cmdstat_wait", {}).get("calls", 0))
                commits = sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))
                run = {"load": load.name, "per_request": load.per_request, "replicas": replicas, "rep": rep,
                       "rps": requests / wall, "eps": requests * load.per_request / wall,
                       "p50_ms": summary["p50_us"] / 1000, "p99_ms": summary["p99_us"] / 1000,
                       "sidecar_us_per_request": 1e6 * (cpu1 - cpu0) / max(requests, 1),
                       "master_us_per_request": 1e6 * (m1 - m0) / max(requests, 1),
                       "replica_us_per_request": 1e6 * (r1 - r0) / max(requests, 1),
                       "wait_calls": waits, "commits": commits, "errors": int(summary["status_errors"])}
                runs.append(run)
                print(f"  rep {rep} {load.name:<12} wait_replicas {replicas}: {run['eps']:>9,.0f} ev/s  p50 "
                      f"{run['p50_ms']:6.2f} ms p99 {run['p99_ms']:6.2f} ms  sidecar "
                      f"{run['sidecar_us_per_request']:6.1f} us/req  master {run['master_us_per_request']:6.1f} "
                      f"us/req  replica {run['replica_us_per_request']:6.1f} us/req  WAIT calls {waits:,} / commits "
                      f"{commits:,}  non-2xx {run['errors']}", flush=True)
    issued = all(r["wait_calls"] > 0 for r in runs if r["replicas"] == 1)
    answered = all(r["rps"] > 0 for r in runs)
    return {"runs": runs, "wait_issued": issued, "answered": answered}


def show_wait(result: dict[str, Any]) -> None:
    runs = result["runs"]
    s = benchlib.stat
    if not result["answered"]:
        print("WAIT: the sidecar answered no request with 2xx on the cluster in some run (no MOVED/ASK-following "
              "client in this checkout?): NOT measured\n")
    if not result["wait_issued"]:
        print("WAIT: the sidecar issued no WAIT with server.wait_replicas 1 (not implemented in this checkout): "
              "its cost is NOT measured\n")
    print("Cost of WAIT (median (min..max); same load with wait_replicas 0 and 1):")
    rows = []
    for load in dict.fromkeys(r["load"] for r in runs):
        for replicas in (0, 1):
            mine = [r for r in runs if r["load"] == load and r["replicas"] == replicas]
            rows.append([f"{load}, wait_replicas {replicas}", s([r["eps"] for r in mine]).show(),
                         s([r["p50_ms"] for r in mine]).show("{:.2f}"), s([r["p99_ms"] for r in mine]).show("{:.2f}"),
                         s([r["sidecar_us_per_request"] for r in mine]).show("{:.1f}"),
                         s([r["sidecar_us_per_request"] / r["per_request"] for r in mine]).show("{:.2f}"),
                         s([r["master_us_per_request"] for r in mine]).show("{:.1f}"),
                         s([r.get("replica_us_per_request", 0.0) for r in mine]).show("{:.1f}"),
                         f"{sum(r['wait_calls'] for r in mine):,}/{sum(r['commits'] for r in mine):,}"])
    print(benchlib.table(["load", "events/s", "p50 ms", "p99 ms", "sidecar us/req", "sidecar us/ev",
                          "master us/req", "replica us/req", "WAITs/commits"], rows))
    print()


# ------------------------------------------------------------------------------------------- flush
async def fill_shards(url: str, pipeline: str, shards: int, rows: int, ttl: int) -> flushbench.Filled:
    """``rows`` counters over the pipeline's shards (flush.py's fill: users split over shards), through the
    cluster client."""
    import redis.asyncio.cluster as aiocluster

    client = aiocluster.RedisCluster.from_url(url)
    try:
        return await flushbench.fill(client, [PipelineKeys.of_tag(tag) for tag in shard_tags(pipeline, shards)],
                                     rows, ttl)
    finally:
        await client.aclose()


async def pg_totals(database_url: str, pipeline: str) -> dict[str, tuple[int, int]]:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        found = {}
        for table in ("analytics_daily", "analytics_hourly", "analytics_user_daily"):
            row = await conn.fetchrow(f"SELECT count(*) AS n, coalesce(sum(count), 0) AS total FROM {table} "
                                      "WHERE pipeline = $1", pipeline)
            found[table] = (int(row["n"]), int(row["total"]))
        return found
    finally:
        await conn.close()


def measure_flush(cluster: RedisClusterServers, args: argparse.Namespace, repeat: int, rows: int,
                  scratch: Path) -> dict[str, Any]:
    postgres = PostgresServer(scratch / "postgres", settings=PRODUCTION_POSTGRES).start()
    runs: list[dict[str, Any]] = []
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("ANALYTICS_CONFIG", "PYTHONPATH")}
        env.update(REDIS_URL=cluster.url, DATABASE_URL=postgres.url)
        console = Path(sys.executable).parent / "analytics-pipeline"
        base = [str(console)] if console.exists() else [sys.executable, "-m", "analytics_pipeline.main"]
        migrate = subprocess.run([*base, "migrate"], env=env, capture_output=True, text=True)
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed: {migrate.stderr[-800:]}")
        print(f"-- flush: {rows:,} counters (7 days, users split over the shards), shards 1 and 3 flushed by one "
              f"`analytics-pipeline flush` (throwaway PostgreSQL, "
              f"{', '.join(f'{k}={v}' for k, v in PRODUCTION_POSTGRES.items())}); "
              f"{repeat} rep(s)", flush=True)
        for rep in range(1, repeat + 1):
            for shards, concurrency in FLUSH_CASES:
                pipeline = f"bench/cflush-{shards}-{rep}-{uuid.uuid4().hex[:6]}"
                config = write_config(scratch, f"flush-{shards}-{concurrency}.yaml", counters={"shards": shards},
                                      flush={"shard_concurrency": concurrency})
                filled = asyncio.run(fill_shards(cluster.url, pipeline, shards, rows, 604800))
                before = resource_children()
                t0 = time.monotonic()
                done = subprocess.run([*base, "flush", "--config", str(config), "--pipeline", pipeline,
                                       "--log-level", "warning"], env=env, capture_output=True, text=True)
                wall = time.monotonic() - t0
                cpu = resource_children() - before
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                summary = json.loads(lines[-1]) if lines else {}
                totals = asyncio.run(pg_totals(postgres.url, pipeline))
                expected = {"analytics_daily": filled.daily, "analytics_hourly": filled.hourly,
                            "analytics_user_daily": filled.user_daily}
                exact = done.returncode == 0 and all(totals[t][1] == expected[t] for t in expected)
                flushed = int(summary.get("rows", 0))
                seconds = float(summary.get("duration_s", wall))
                run = {"shards": shards, "concurrency": concurrency, "rep": rep, "rows": flushed, "seconds": seconds,
                       "wall": wall,
                       "rows_per_s": flushed / seconds if seconds else 0.0, "flusher_cpu_s": cpu,
                       "exact": exact, "exit": done.returncode, "details": summary.get("pipelines")}
                run["rows_per_s_per_shard"] = run["rows_per_s"] / shards
                runs.append(run)
                print(f"  rep {rep} shards {shards} ({concurrency} at once): {flushed:>9,} rows in {seconds:6.2f} s  "
                      f"{run['rows_per_s']:>9,.0f} rows/s ({run['rows_per_s_per_shard']:,.0f} per shard)  "
                      f"flusher CPU {cpu:.2f} s  "
                      f"[{'OK' if exact else 'FAIL: ' + (done.stderr.strip()[-300:] or str(totals))}]", flush=True)
    finally:
        postgres.destroy()
    return {"rows": rows, "runs": runs, "verified": all(r["exact"] for r in runs)}


def resource_children() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def show_flush(result: dict[str, Any]) -> None:
    s = benchlib.stat
    rows = []
    for shards, concurrency in FLUSH_CASES:
        mine = [r for r in result["runs"] if r["shards"] == shards
                and r.get("concurrency", min(shards, 4)) == concurrency]  # 4: flush.shard_concurrency's default
        if not mine:
            continue
        rows.append([f"{result['rows']:,} rows in {shards} shard(s), {concurrency} at once",
                     s([r["seconds"] for r in mine]).show("{:.2f}"), s([r["rows_per_s"] for r in mine]).show(),
                     s([r["rows_per_s_per_shard"] for r in mine]).show(),
                     s([r["flusher_cpu_s"] for r in mine]).show("{:.2f}"),
                     "yes" if all(r["exact"] for r in mine) else "NO"])
    print("Flush with shards flushed concurrently (median (min..max)):")
    print(benchlib.table(["flush", "seconds", "rows/s", "rows/s per shard", "flusher CPU s", "totals exact"], rows))
    print()


# -------------------------------------------------------------------------------------------- main
def show_all(figures: dict[str, Any]) -> None:
    if "spread" in figures:
        show_spread(figures["spread"])
    if "wait" in figures:
        show_wait(figures["wait"])
    if "flush" in figures:
        show_flush(figures["flush"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition, 2 s runs, 50k-row flushes")
    parser.add_argument("--only", help="comma-separated measures: spread,wait,flush (default all)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; --quick 1)")
    parser.add_argument("--seconds", type=float, help="seconds per wrk run (default 5; --quick 2)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds before each wrk run")
    parser.add_argument("--batch", type=int, default=100, help="events per request of the batch loads (default 100)")
    parser.add_argument("--rows", type=int, help="counters in the flush measure, over all shards (default 300,000; "
                                                 "--quick 50,000)")
    parser.add_argument("--save", metavar="FILE", help="write the measured figures as JSON")
    parser.add_argument("--show", metavar="FILE", help="measure nothing: print the tables of figures saved by --save")
    args = parser.parse_args()
    if args.show:
        show_all(json.loads(Path(args.show).read_text()))
        return 0
    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    rows = args.rows or (50_000 if args.quick else 300_000)
    only = set((args.only or "spread,wait,flush").split(","))
    ingest.compile_sources()
    figures: dict[str, Any] = {"load_avg_start": benchlib.load_average(), "command": benchlib.rerun_command()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as folder:
        scratch = Path(folder)
        cluster = RedisClusterServers(scratch / "cluster").start()
        try:
            version = redis.Redis(host="127.0.0.1", port=cluster.nodes[0].port).info("server")["redis_version"]
            benchlib.print_header("cluster benchmark", redis_version=f"{version} (throwaway 3-master/3-replica "
                                                                     "cluster)")
            print("nodes: " + ", ".join(f"{port} {role}" for port, role in sorted(masters_by_port(cluster).items()))
                  + "\n", flush=True)
            if "spread" in only:
                figures["spread"] = measure_spread(cluster, args, repeat, seconds, scratch)
                ok &= figures["spread"]["verified"]
            if "wait" in only:
                figures["wait"] = measure_wait(cluster, args, repeat, seconds, scratch)
            if "flush" in only:
                figures["flush"] = measure_flush(cluster, args, repeat, rows, scratch)
                ok &= figures["flush"]["verified"]
        finally:
            cluster.stop()
    figures["load_avg_end"] = benchlib.load_average()
    print(f"\nload avg at start {figures['load_avg_start']}, at end {figures['load_avg_end']}\n")
    show_all(figures)
    if args.save:
        Path(args.save).write_text(json.dumps(figures, indent=1))
        print(f"figures saved to {args.save}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
