"""core/redis_clients.py: which client each redis.cluster mode gives, and what a mismatch says; the
eviction-policy check over every master of a cluster (core/redis_requirements.check_nodes)."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis

from analytics_pipeline.core.redis_clients import (
    RedisModeError,
    async_client,
    cluster_enabled,
    is_cluster_client,
    mode_hint,
    sync_client,
)
from analytics_pipeline.core.redis_requirements import check_nodes


def test_cluster_enabled_reads_parsed_and_raw_info() -> None:
    assert cluster_enabled({"cluster_enabled": 1}) and not cluster_enabled({"cluster_enabled": 0})
    assert cluster_enabled(b"# Cluster\r\ncluster_enabled:1\r\n") and not cluster_enabled("cluster_enabled:0")


def test_check_nodes_names_the_master_that_evicts() -> None:
    replies = {"127.0.0.1:7001": ["maxmemory-policy", "noeviction"],
               "127.0.0.1:7002": {"maxmemory-policy": "allkeys-lru"},
               "127.0.0.1:7003": ["maxmemory-policy", "noeviction"]}
    check = check_nodes(replies, allowed=False)
    assert check.node == "127.0.0.1:7002" and check.problem is not None
    assert "allkeys-lru" in check.problem and "127.0.0.1:7002" in check.problem
    assert check_nodes(replies, allowed=True).problem is None
    good = check_nodes({n: ["maxmemory-policy", "noeviction"] for n in replies}, allowed=False)
    assert good.problem is None and good.warning is None and good.policy == "noeviction"


def test_mode_hint_only_for_redirects() -> None:
    assert "redis.cluster: auto" in (mode_hint(redis.exceptions.MovedError("12 127.0.0.1:7000")) or "")
    assert mode_hint(redis.exceptions.ResponseError("WRONGTYPE")) is None


async def test_plain_redis_gets_the_plain_client_and_on_says_how_to_fix(redis_url: str) -> None:
    for mode in ("auto", "off"):
        client = await async_client(redis_url, mode, decode_responses=True)  # type: ignore[arg-type]
        try:
            assert type(client) is aioredis.Redis and await client.ping()
        finally:
            await client.aclose()
    with pytest.raises(RedisModeError, match=r"is not a Redis Cluster node.*redis\.cluster: auto"):
        await async_client(redis_url, "on")
    with pytest.raises(RedisModeError, match="is not a Redis Cluster node"):
        sync_client(redis_url.rsplit("/", 1)[0], "on")
    client = sync_client(redis_url, "auto")
    try:
        assert not is_cluster_client(client) and client.ping()
    finally:
        client.close()


async def test_cluster_from_any_node_and_database_refused(redis_cluster) -> None:
    for node in redis_cluster.nodes[:4]:  # masters and a replica: any node's URL finds the whole cluster
        client = await async_client(node.url.rsplit("/", 1)[0], "auto")
        try:
            assert is_cluster_client(client) and len(client.get_primaries()) == 3  # type: ignore[union-attr]
        finally:
            await client.aclose()
    with pytest.raises(RedisModeError, match="only database 0"):
        await async_client(redis_cluster.url + "/3", "auto")
    client = sync_client(redis_cluster.url, "auto")
    try:
        assert is_cluster_client(client) and len(list(client.scan_iter(count=100))) == 0
    finally:
        client.close()
