"""The flusher, queries and read endpoints on a real Redis Cluster (3 masters + 3 replicas, tests/conftest.py).

Live buckets are written with redis-py's cluster client in the sidecar's layout (the sidecar's own
hot-path connection is not under test here); pipelines are picked so their slots live on different
masters. Exactly once through a failover: a claim is applied only once a replica holds it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from flushkit import WRITE_LUA, LuaWriter, assert_clean, delete_pipeline_rows, pg_counters, redis_leftovers
from support import flush_env, make_config, run_cli_async

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.redis_clients import async_client
from analytics_pipeline.core.services import RedisClusterServers
from analytics_pipeline.demo_stack import remove_pipeline_data
from analytics_pipeline.flusher.run import PipelineFlush, flush_pipeline
from analytics_pipeline.reads.queries import Queries
from analytics_pipeline.reads.query_routes import setup_query_routes
from analytics_pipeline.sidecar.appkeys import CONFIG, REDIS
from analytics_pipeline.sidecar.redis_client import lazy_redis

NOW = datetime.now(UTC).replace(microsecond=0)

# commit.lua's bucket layout without the SADD of ap:pipelines: that key has a slot of its own, so on a
# cluster it is written by a command of its own (as the sidecar does)
CLUSTER_WRITE_LUA = WRITE_LUA.replace("redis.call('SADD', KEYS[2], ARGV[2])\n", "")


class ClusterWriter(LuaWriter):
    """The sidecar stand-in on a cluster: one script per write on the pipeline's slot, then SADD."""

    def __init__(self, client: aioredis.RedisCluster, config: Config) -> None:
        super().__init__(client, config)  # type: ignore[arg-type]
        self._script = client.register_script(CLUSTER_WRITE_LUA)

    async def write(self, events: Sequence[tuple[str, str | None, datetime]]) -> None:
        increments = self.increments(events)
        await self._script(keys=[self.keys.dirty], args=self._args(increments))
        await self.client.sadd(PIPELINES_SET, self.config.pipeline)
        self.expected.update(increments)


def spread(cluster: RedisClusterServers, base: str, count: int) -> list[str]:
    """``count`` pipeline names whose slots are owned by ``count`` different masters."""
    masters = cluster.live_masters()
    names: dict[object, str] = {}
    for i in range(1000):
        name = f"{base}-{i}"
        slot = PipelineKeys(name).slot
        port = next(m["port"] for m in masters if any(lo <= slot <= hi for lo, hi in m["slots"]))  # type: ignore[attr-defined]
        names.setdefault(port, name)
        if len(names) == count:
            return list(names.values())
    raise AssertionError("could not spread pipelines over the masters")


def caught_up(port: int, timeout: float = 60) -> None:
    """Until every replica of master ``port`` has all of its writes (acked writes a failover must not lose:
    the sidecar's server.wait_replicas is what guarantees that in production, not under test here)."""
    import time

    import redis

    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            info = client.info("replication")
            offsets = [info[f"slave{i}"]["offset"] for i in range(int(info["connected_slaves"]))]
            if offsets and min(offsets) >= info["master_repl_offset"]:
                return
            time.sleep(0.02)
    finally:
        client.close()
    raise AssertionError(f"the replicas of {port} did not catch up")


def events(n: int, offset: int = 0) -> list[tuple[str, str | None, datetime]]:
    """``n`` events over two types, four users and the last three hours."""
    return [("view" if i % 3 else "click", f"u{(i + offset) % 4}", NOW - timedelta(hours=i % 3)) for i in range(n)]


@pytest.fixture
async def cluster_client(redis_cluster: RedisClusterServers) -> AsyncIterator[aioredis.RedisCluster]:
    client = await async_client(redis_cluster.url, "auto", decode_responses=True)
    assert isinstance(client, aioredis.RedisCluster)  # auto found the cluster from one node's URL
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def rows(schema: str) -> AsyncIterator[list[str]]:
    """Pipelines whose PostgreSQL rows are removed afterwards (append to it)."""
    names: list[str] = []
    conn = await asyncpg.connect(schema)
    try:
        yield names
    finally:
        for name in names:
            await delete_pipeline_rows(conn, name)
        await conn.close()


async def totals(pg: asyncpg.Connection, writers: list[ClusterWriter]) -> None:
    for writer in writers:
        assert await pg_counters(pg, writer.config.pipeline) == writer.expected, writer.config.pipeline


def summary_of(out: str) -> dict[str, object]:
    return json.loads(out.strip().splitlines()[-1])


async def test_flush_and_queries_on_three_masters(redis_cluster: RedisClusterServers,
                                                  cluster_client: aioredis.RedisCluster, pg: asyncpg.Connection,
                                                  pipeline: str, database_url: str, rows: list[str]) -> None:
    names = spread(redis_cluster, pipeline, 3)
    rows.extend(names)
    writers = [ClusterWriter(cluster_client, make_config(name, redis_cluster.url, database_url)) for name in names]
    owners = {redis_cluster.owner_of_slot(PipelineKeys(name).slot)["port"] for name in names}
    assert len(owners) == 3  # the keys really live on three masters
    for round_ in range(2):
        for writer in writers:
            await writer.write(events(40, round_))
    # in process: the first pipeline, with its claims WAITed for (every master has one replica)
    stats = await flush_pipeline(cluster_client, pg, writers[0].config, names[0])  # type: ignore[arg-type]
    assert stats.error is None and stats.units >= 1 and stats.replicas_required == 1
    assert stats.unreplicated_units == []
    # the CLI: flush --all finds every pipeline through ap:pipelines (a slot of its own)
    code, out, err = await run_cli_async(["flush", "--all", "--batch-size", "2"], flush_env(writers[0].config))
    assert code == 0, err
    summary = summary_of(out)
    assert set(names) <= set(summary["pipelines"])  # type: ignore[operator]
    assert summary["redis_maxmemory_policy"] == "noeviction"
    assert all(summary["pipelines"][n]["replicas_required"] == 1 for n in names)  # type: ignore[index]
    await totals(pg, writers)
    for writer in writers:
        assert_clean(await redis_leftovers(cluster_client, writer.keys))  # type: ignore[arg-type]

    # queries: PostgreSQL + live Redis, MULTI/EXEC snapshot on the pipeline's slot, through the cluster client
    for writer in writers:
        await writer.write(events(9, 1))
    for writer in writers:
        expected = Counter[str]()
        for key, count in writer.expected.items():
            if key[0] == "d":
                expected[key[1]] += count
        queries = Queries.for_config(cluster_client, pg, writer.config)  # type: ignore[arg-type]
        assert {t.event: t.count for t in await queries.event_types()} == dict(expected)
        series = await queries.counts("view", NOW.date() - timedelta(days=1), NOW.date(), "day")
        assert series.total == expected["view"]
        # the read endpoints, with create_app's lazy client (which finds the cluster itself)
        app = web.Application()
        app[CONFIG] = writer.config
        app[REDIS] = lazy_redis(redis_cluster.url, 5.0, "auto")
        setup_query_routes(app)
        http = TestClient(TestServer(app))
        await http.start_server()
        try:
            body = await (await http.get("/v1/events")).json()
            assert {e["event"]: e["count"] for e in body["events"]} == dict(expected)
            body = await (await http.get("/v1/counts", params={"event": "click"})).json()
            assert body["total"] == expected["click"]
        finally:
            await http.close()
            await app[REDIS].aclose()
    code, out, err = await run_cli_async(["flush", "--all"], flush_env(writers[0].config))
    assert code == 0, err
    await totals(pg, writers)
    # the demo's cleanup SCANs every master (RedisCluster.scan_iter) and deletes each pipeline's keys
    for writer in writers:
        await writer.write(events(3))
    assert {key async for key in cluster_client.scan_iter(match="ap:{*", count=1000)}
    for name in names:
        await remove_pipeline_data(cluster_client, pg, name)  # type: ignore[arg-type]
    assert [key async for key in cluster_client.scan_iter(match="ap:{*", count=1000)] == []
    assert not set(names) & await cluster_client.smembers(PIPELINES_SET)


async def test_evicting_policy_on_one_master_is_refused_naming_it(redis_cluster: RedisClusterServers,
                                                                  pg: asyncpg.Connection, config: Config) -> None:
    bad = redis_cluster.live_masters()[1]["port"]
    node = aioredis.Redis(host="127.0.0.1", port=bad)
    try:
        await node.config_set("maxmemory-policy", "allkeys-lru")
    finally:
        await node.aclose()
    code, out, err = await run_cli_async(["flush"], flush_env(config.replace(redis_url=redis_cluster.url)))
    assert code == 2, (out, err)
    error = summary_of(out)["error"]
    assert f"127.0.0.1:{bad}" in error and "allkeys-lru" in error and "noeviction" in error  # type: ignore[operator]
    assert f"127.0.0.1:{bad}" in err


async def test_cluster_mode_mismatch_says_how_to_fix_it(redis_cluster: RedisClusterServers, redis_url: str,
                                                        pg: asyncpg.Connection, config: Config, tmp_path: Path) -> None:
    off = tmp_path / "off.yaml"
    off.write_text("redis:\n  cluster: 'off'\n")
    # 'off' against a cluster node: some pipeline lives on another master, its commands get MOVED
    names = spread(redis_cluster, config.pipeline, 3)
    first = redis_cluster.nodes[0].port
    other = next(n for n in names
                 if redis_cluster.owner_of_slot(PipelineKeys(n).slot)["port"] != first)
    code, out, err = await run_cli_async(
        ["flush", "--pipeline", other, "--config", str(off)], flush_env(config.replace(redis_url=redis_cluster.url)))
    assert code == 2, (out, err)
    assert "MovedError" in err and "redis.cluster is 'off'" in err and "redis.cluster: auto" in err
    on = tmp_path / "on.yaml"
    on.write_text("redis:\n  cluster: 'on'\n")
    code, out, err = await run_cli_async(["flush", "--config", str(on)], flush_env(config.replace(redis_url=redis_url)))
    assert code == 2, (out, err)
    assert "is not a Redis Cluster node" in err and "redis.cluster: auto" in err


async def test_unreplicated_claim_is_not_applied_and_a_failover_then_counts_it_once(
        redis_cluster: RedisClusterServers, cluster_client: aioredis.RedisCluster, pg: asyncpg.Connection,
        pipeline: str, database_url: str) -> None:
    """The double count the WAIT prevents: the claim never reaches the replica, the master dies, the replica
    (promoted) still has the live buckets dirty. Applying the unit before the failover would count them twice."""
    config = make_config(pipeline, redis_cluster.url, database_url,
                         server={"wait_replicas": 1, "wait_replicas_timeout_seconds": 0.5})
    writer = ClusterWriter(cluster_client, config)
    await writer.write(events(30))
    master = redis_cluster.owner_of_slot(PipelineKeys(pipeline).slot)
    replica = next(n for n in redis_cluster.cluster_nodes() if n["master"] == master["id"])
    caught_up(master["port"])  # type: ignore[arg-type]
    # cut the replica off: stopped (it cannot reconnect) and its link closed by the master, so nothing
    # written from now on reaches it (with the link merely stalled, bytes already sent would still arrive)
    redis_cluster.node(replica["port"]).pause()
    node = aioredis.Redis(host="127.0.0.1", port=master["port"])  # type: ignore[arg-type]
    try:
        assert await node.client_kill_filter(_type="replica") == 1
    finally:
        await node.aclose()
    try:
        stats = await flush_pipeline(cluster_client, pg, config, pipeline)  # type: ignore[arg-type]
    finally:
        redis_cluster.kill(master["port"])
        redis_cluster.node(replica["port"]).resume()
    assert stats.replicas_required == 1 and len(stats.unreplicated_units) == 1 and stats.units == 0
    assert "left in flight" in (stats.error or "")
    assert await pg_counters(pg, pipeline) == Counter()  # nothing applied
    redis_cluster.wait_promoted(master["port"])
    live = f"redis://127.0.0.1:{redis_cluster.live_masters()[0]['port']}"  # the URL's node may be the dead one
    client = await async_client(live, "auto", decode_responses=True)
    try:
        keys = PipelineKeys(pipeline)
        assert await client.zcard(keys.dirty) > 0  # the claim was lost: the live buckets are back
        assert await client.zcard(keys.inflight) == 0
        # wait_replicas: 1 would now hold every unit (the promoted master has no replica): the default
        # waits for the replicas there are
        config = make_config(pipeline, live, database_url)
        stats = await flush_pipeline(client, pg, config, pipeline)  # type: ignore[arg-type]
        assert stats.error is None, stats.error
        assert stats.replicas_required == 0  # the promoted replica has no replica of its own
        assert await pg_counters(pg, pipeline) == writer.expected
        assert_clean(await redis_leftovers(client, keys))  # type: ignore[arg-type]
    finally:
        await client.aclose()


@pytest.mark.parametrize("step", ["after_claim", "after_commit"])
async def test_master_killed_mid_flush_then_promoted_counts_exactly_once(
        redis_cluster: RedisClusterServers, cluster_client: aioredis.RedisCluster, pg: asyncpg.Connection,
        pipeline: str, database_url: str, step: str) -> None:
    config = make_config(pipeline, redis_cluster.url, database_url)
    writer = ClusterWriter(cluster_client, config)
    for round_ in range(3):
        await writer.write(events(25, round_))
    master = redis_cluster.owner_of_slot(PipelineKeys(pipeline).slot)
    caught_up(master["port"])  # type: ignore[arg-type]

    async def crash(name: str) -> None:
        if name == step:
            redis_cluster.kill(master["port"])

    stats = await PipelineFlush(cluster_client, pg, config, pipeline, batch_size=2, hook=crash).run()  # type: ignore[arg-type]
    assert stats.error is not None and stats.exit_code == 2  # Redis went away mid-run
    redis_cluster.wait_promoted(master["port"])
    await writer.write(events(7, 5))  # the cluster client follows the failover itself
    live = f"redis://127.0.0.1:{redis_cluster.live_masters()[0]['port']}"  # the URL's node may be the dead one
    client = await async_client(live, "auto", decode_responses=True)
    try:
        # --no-lock: the killed run's lock (replicated) would keep this run out until its TTL
        code, _, err = await run_cli_async(["flush", "--no-lock"], flush_env(config.replace(redis_url=live)))
        assert code == 0, err
        assert await pg_counters(pg, pipeline) == writer.expected  # nothing lost, nothing twice
        assert_clean(await redis_leftovers(client, PipelineKeys(pipeline)))  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_flusher_killed_after_its_claim_then_master_killed_counts_exactly_once(
        redis_cluster: RedisClusterServers, cluster_client: aioredis.RedisCluster, pg: asyncpg.Connection,
        pipeline: str, database_url: str) -> None:
    """The flusher process SIGKILLed right after a claim (flusher/faults.py), then the master: the claim is
    in flight on the promoted replica or lost with the master; either way the next run counts it once."""
    config = make_config(pipeline, redis_cluster.url, database_url)
    writer = ClusterWriter(cluster_client, config)
    await writer.write(events(40))
    master = redis_cluster.owner_of_slot(PipelineKeys(pipeline).slot)
    caught_up(master["port"])  # type: ignore[arg-type]
    code, _, err = await run_cli_async(["flush", "--batch-size", "2"],
                                       flush_env(config, ANALYTICS_FLUSH_FAULT="after_claim:2"))
    assert code == -9, err  # SIGKILLed by the fault hook after its second claim
    redis_cluster.kill(master["port"])
    redis_cluster.wait_promoted(master["port"])
    live = f"redis://127.0.0.1:{redis_cluster.live_masters()[0]['port']}"
    code, _, err = await run_cli_async(["flush", "--no-lock"], flush_env(config.replace(redis_url=live)))
    assert code == 0, err
    assert await pg_counters(pg, pipeline) == writer.expected
    client = await async_client(live, "auto", decode_responses=True)
    try:
        assert_clean(await redis_leftovers(client, PipelineKeys(pipeline)))  # type: ignore[arg-type]
    finally:
        await client.aclose()


async def test_slot_moved_mid_run_is_followed_by_the_claim_link(
        redis_cluster: RedisClusterServers, cluster_client: aioredis.RedisCluster, pg: asyncpg.Connection,
        pipeline: str, database_url: str, rows: list[str]) -> None:
    """The pipeline's slot migrates (redis-cli --cluster reshard) after the run opened its claim link: the
    claim gets MOVED there, the link follows the new slot map, the claim is WAITed for on the new owner."""
    master = redis_cluster.live_masters()[0]
    low = master["slots"][0][0]  # type: ignore[index]
    name = next(f"{pipeline}-{i}" for i in range(1_000_000) if PipelineKeys(f"{pipeline}-{i}").slot == low)
    rows.append(name)
    config = make_config(name, redis_cluster.url, database_url)
    writer = ClusterWriter(cluster_client, config)
    await writer.write(events(30))
    target = redis_cluster.live_masters()[1]

    async def migrate(step: str) -> None:
        if step == "after_recover":  # reshard moves the source's lowest slots first: this pipeline's
            redis_cluster.reshard(str(master["id"]), str(target["id"]), 1)
            assert redis_cluster.owner_of_slot(low)["port"] == target["port"]

    flush = PipelineFlush(cluster_client, pg, config, name, hook=migrate)  # type: ignore[arg-type]
    stats = await flush.run()
    assert stats.error is None, stats.error
    assert stats.units >= 1 and stats.replicas_required == 1
    assert flush.link.node == f"127.0.0.1:{target['port']}"  # the claim ran (and was WAITed for) there
    assert await pg_counters(pg, name) == writer.expected
    assert_clean(await redis_leftovers(cluster_client, PipelineKeys(name)))  # type: ignore[arg-type]
