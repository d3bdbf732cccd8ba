"""The whole pipeline against a Redis in cluster mode: no script or multi-key command crosses slots.

A one-node Redis Cluster owning all 16384 slots answers every key itself (no MOVED redirects, so the
plain clients work) but still refuses, with CROSSSLOT, any command or script whose keys hash to more
than one slot — exactly what would break on a real multi-node cluster. Every pipeline key carries the
pipeline's hash tag; ``ap:pipelines`` is the one key outside it and is only touched on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis
from support import flush_env, make_config, run_cli_async, run_demo

from analytics_pipeline.core.events import Event
from analytics_pipeline.core.keys import PIPELINES_SET
from analytics_pipeline.core.services import RedisServer, free_port
from analytics_pipeline.demo_stack import remove_pipeline_data
from analytics_pipeline.sidecar.committer import GroupCommitter


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[RedisServer]:
    """A single-node Redis Cluster serving every slot."""
    # The cluster bus defaults to port + 10000, past 65535 for half of the free ports: name it.
    server = RedisServer(tmp_path / "cluster", extra_args=(
        "--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "cluster" / "nodes.conf"),
        "--cluster-port", str(free_port()))).start()
    try:
        client = redis.Redis.from_url(server.url)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 15
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never reached cluster_state:ok"
            time.sleep(0.05)
        # The node really is strict: keys of two slots in one command are refused.
        with pytest.raises(redis.ResponseError, match="same slot"):
            client.delete("ap:{a/b}:x", "ap:{c/d}:x")
        client.close()
        yield server
    finally:
        server.stop()


def test_demo_passes_on_redis_cluster(cluster_node: RedisServer, database_url: str) -> None:
    """Sidecar group commits, flusher claim/apply/cleanup, query snapshots, dashboard: all on one slot each."""
    result, summary = run_demo(cluster_node.url, database_url)
    assert result.returncode == 0, result.stderr
    assert summary["ok"] is True and summary["diff"] == []
    assert summary["observed"]["total"] == summary["expected"]["total"] == 2000
    assert len(summary["flushes"]) >= 3 and all(f["error"] is None for f in summary["flushes"])
    assert "same slot" not in result.stderr


async def test_sidecar_registers_and_flush_all_finds_pipelines_on_redis_cluster(
        cluster_node: RedisServer, database_url: str, pipeline: str) -> None:
    names = [pipeline, pipeline + "-2"]
    client = aioredis.Redis.from_url(cluster_node.url, decode_responses=True)
    now = datetime.now(UTC)
    try:
        for name in names:
            committer = GroupCommitter(make_config(name, cluster_node.url, database_url))
            try:
                assert await committer.commit([Event("view", "u1", now, None), Event("view", "u2", now, "m")]) == 0
            finally:
                await committer.close()
        assert await client.smembers(PIPELINES_SET) == set(names)
        config = make_config(pipeline, cluster_node.url, database_url)
        code, out, err = await run_cli_async(["flush", "--all"], flush_env(config))
        assert code == 0, err
        summary = json.loads(out.splitlines()[-1])
        assert sorted(summary["pipelines"]) == sorted(names)
        assert summary["rows"] == 2 * (1 + 1 + 2)  # per pipeline: daily, hourly, two users
        assert "same slot" not in err
    finally:
        conn = await asyncpg.connect(database_url)
        try:
            for name in names:
                await remove_pipeline_data(client, conn, name)
        finally:
            await conn.close()
            await client.aclose()


def test_harness_cluster_has_three_masters_each_with_a_synced_replica(redis_cluster) -> None:
    """The multi-node harness the scale-out tests build on: 3 masters x 1 replica, all slots served."""
    nodes = redis_cluster.cluster_nodes()
    masters = [n for n in nodes if n["role"] == "master"]
    replicas = [n for n in nodes if n["role"] == "replica"]
    assert len(masters) == 3 and len(replicas) == 3
    assert sum(high - low + 1 for m in masters for low, high in m["slots"]) == 16384
    assert {r["master"] for r in replicas} == {m["id"] for m in masters}
    client = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        client.set("ap:{harness}:x", "1")
        owner = redis_cluster.owner_of_slot(client.keyslot("ap:{harness}:x"))
    finally:
        client.close()
    redis_cluster.kill(owner["port"])
    redis_cluster.wait_promoted(owner["port"])
    client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.live_masters()[0]["port"])
    try:
        assert client.get("ap:{harness}:x") == b"1"  # the promoted replica had it
    finally:
        client.close()


def test_harness_builds_the_cluster_afresh_when_it_does_not_settle(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster whose gossip never settles (seen once in a loaded CI run) is stopped and built again."""
    from analytics_pipeline.core.services import RedisClusterServers, ServiceError

    calls: list[int] = []
    settle = RedisClusterServers._wait_topology_agreed

    def flaky(self: RedisClusterServers, timeout: float = 60) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ServiceError("did not settle (test)")
        settle(self, timeout)

    monkeypatch.setattr(RedisClusterServers, "_wait_topology_agreed", flaky)
    cluster = RedisClusterServers(tmp_path / "cluster")
    first = list(cluster.nodes)
    cluster.start()
    try:
        assert len(calls) == 2 and all(node.process is None for node in first)  # the first build is gone
        assert {n.port for n in cluster.nodes}.isdisjoint({n.port for n in first})
        assert len(cluster.live_masters()) == 3
    finally:
        cluster.stop()
