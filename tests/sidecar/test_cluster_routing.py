"""The sidecar on a real 3-master/3-replica Redis Cluster: slot routing, shards on different masters,
MOVED and ASK under a live slot migration, with exact totals (every 2xx counted once, no 503 counted)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

import pytest
import redis
from cluster_load import Tally, closed_loop, daily_totals, metric, wait_for
from redis.cluster import RedisCluster
from sidecar_helpers import SidecarFactory
from support import make_config

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, key_slot, sidecar_shard_tag
from analytics_pipeline.core.services import RedisClusterServers
from analytics_pipeline.sidecar.appkeys import STATE
from analytics_pipeline.sidecar.committer import GroupCommitter

REDIRECTS = "analytics_sidecar_redis_redirects_total"


def node_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}"


def cluster_client(cluster: RedisClusterServers) -> RedisCluster:
    return RedisCluster.from_url(cluster.url, decode_responses=True)


async def test_writes_reach_the_slot_owner_whatever_node_the_url_names(
        redis_cluster: RedisClusterServers, start_sidecar: SidecarFactory, sidecar_config, pipeline: str) -> None:
    keys = PipelineKeys(pipeline)
    owner = redis_cluster.owner_of_slot(keys.slot)
    other = next(m for m in redis_cluster.live_masters() if m["port"] != owner["port"])
    sidecar = await start_sidecar(sidecar_config(redis_url=node_url(other["port"])))  # type: ignore[arg-type]
    for _ in range(5):
        answer = await sidecar.post("/v1/events", [{"event": "view", "user_id": "u1"}, {"event": "click"}])
        assert answer.status == 200, answer.body
    assert sidecar.app[STATE].committer.topology.cluster is True
    client = cluster_client(redis_cluster)
    try:
        assert daily_totals(client, keys) == {"view": 5, "click": 5}
        assert pipeline in client.smembers(PIPELINES_SET)
    finally:
        client.close()
    direct = redis.Redis(port=owner["port"])  # type: ignore[arg-type]
    try:
        assert direct.exists(keys.daily(datetime.now(UTC)))
    finally:
        direct.close()
    ready = await sidecar.get("/readyz")
    assert ready.status == 200 and ready.body["shard"] == pipeline, ready.body


async def test_three_shards_spread_pods_over_masters(
        redis_cluster: RedisClusterServers, start_sidecar: SidecarFactory, sidecar_config, pipeline: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pods: dict[str, str] = {}  # shard tag -> a pod name that writes it
    for number in itertools.count():
        name = f"app-7d9f-{number}"
        pods.setdefault(sidecar_shard_tag(pipeline, 3, name), name)
        if len(pods) == 3:
            break
    config = sidecar_config(redis_url=redis_cluster.url, counters={"shards": 3})
    sidecars = {}
    for tag, pod in pods.items():
        monkeypatch.setenv("POD_NAME", pod)
        sidecars[tag] = await start_sidecar(config)
        assert sidecars[tag].app[STATE].committer.keys.tag == tag
        assert metric(sidecars[tag], "analytics_sidecar_shard", tag=tag) == 1
    for count, sidecar in enumerate(sidecars.values(), start=1):
        for _ in range(count):
            assert (await sidecar.post("/v1/events", {"event": "view"})).status == 200
    owners = {redis_cluster.owner_of_slot(PipelineKeys.of_tag(tag).slot)["port"] for tag in pods}
    assert len(owners) > 1, "the 3 shards of a pipeline should sit on more than one master"
    client = cluster_client(redis_cluster)
    try:
        for count, tag in enumerate(sidecars, start=1):
            assert daily_totals(client, PipelineKeys.of_tag(tag)) == {"view": count}
        assert set(pods) <= client.smembers(PIPELINES_SET)
    finally:
        client.close()


def _replica_totals(port: int, keys: PipelineKeys) -> dict[str, int]:
    client = redis.Redis(port=port, decode_responses=True)
    try:
        client.execute_command("READONLY")
        return daily_totals(client, keys)
    finally:
        client.close()


def _name_on_slot(slot: int) -> str:
    """A pipeline name whose tag hashes to ``slot`` (so a reshard of that one slot moves it)."""
    for number in itertools.count():
        name = f"test/moving-{number}"
        if key_slot(f"{{{name}}}") == slot:
            return name
    raise AssertionError("unreachable")


@pytest.mark.slow
async def test_slot_migrated_under_load_moved_and_ask_totals_exact(
        redis_cluster: RedisClusterServers, start_sidecar: SidecarFactory, database_url: str) -> None:
    # redis-cli --cluster reshard moves the lowest slots of the source first: take a pipeline on the
    # first slot of a master and move exactly that slot.
    source = redis_cluster.live_masters()[0]
    first_slot = min(low for low, _ in source["slots"])  # type: ignore[attr-defined]
    pipeline = _name_on_slot(first_slot)
    keys = PipelineKeys(pipeline)
    target = next(m for m in redis_cluster.live_masters() if m["id"] != source["id"])
    client = cluster_client(redis_cluster)
    # Many keys in the slot and a small --cluster-pipeline: the migration lasts while clients post.
    filler = client.pipeline(transaction=False)
    for number in range(30_000):
        filler.set(f"ap:{{{pipeline}}}:filler:{number}", "x")
    filler.execute()
    sidecar = await start_sidecar(make_config(pipeline, node_url(target["port"]), database_url),
                                  fence_deadline_seconds=60)
    stop = asyncio.Event()
    tally = Tally()
    load = asyncio.create_task(closed_loop(sidecar, stop, tally=tally))
    try:
        await wait_for(lambda: tally.answers.get(200, 0) >= 50, what="load to start")
        await asyncio.to_thread(redis_cluster.reshard, str(source["id"]), str(target["id"]), 1, pipeline=5)
        assert redis_cluster.owner_of_slot(keys.slot)["id"] == target["id"]
        after = tally.answers.get(200, 0)
        await wait_for(lambda: tally.answers.get(200, 0) >= after + 50, what="writes after the migration")
    finally:
        stop.set()
        await load
    try:
        stored = daily_totals(client, keys)
    finally:
        client.close()
    moved, asked = metric(sidecar, REDIRECTS, kind="moved"), metric(sidecar, REDIRECTS, kind="ask")
    print(f"answers {tally.answers}, acked events {tally.acked_total}, MOVED {moved:.0f}, ASK {asked:.0f}")
    assert moved >= 1 and asked >= 1
    assert metric(sidecar, "analytics_sidecar_ambiguous_writes_total", outcome="unknown") == 0
    assert stored == tally.acked, (stored, tally.acked)


@pytest.mark.slow
async def test_fence_of_an_unanswered_write_follows_the_failover(
        redis_cluster: RedisClusterServers, start_sidecar: SidecarFactory, sidecar_config, pipeline: str) -> None:
    keys = PipelineKeys(pipeline)
    owner = redis_cluster.owner_of_slot(keys.slot)
    port = int(owner["port"])  # type: ignore[call-overload]
    sidecar = await start_sidecar(sidecar_config(redis_url=redis_cluster.url, server={"redis_timeout_seconds": 0.5}),
                                  fence_deadline_seconds=120)
    assert (await sidecar.post("/v1/events", {"event": "warm"})).status == 200
    replica = next(n for n in redis_cluster.cluster_nodes() if n["master"] == owner["id"])
    await wait_for(lambda: _replica_totals(int(replica["port"]), keys) == {"warm": 1},  # type: ignore[call-overload]
                   what="the replica to have the acked event")
    redis_cluster.node(port).pause()  # the script goes out and is never answered: ambiguous
    request = asyncio.create_task(sidecar.post("/v1/events", {"event": "lost"}))
    state = sidecar.app[STATE]
    # Timed out: the lane is free again and nothing is pending, but the request waits for its fence.
    await wait_for(lambda: state.in_flight == 1 and state.committer.pending_events == 0
                   and state.committer.writes_in_flight == 0, what="the write to time out")
    redis_cluster.kill(port)  # it dies with the script unread; its replica takes over
    await asyncio.to_thread(redis_cluster.wait_promoted, port)
    answer = await request
    # The fence went to the slot's new master, won there, and so the write can never apply.
    assert answer.status == 503, answer.body
    assert metric(sidecar, "analytics_sidecar_ambiguous_writes_total", outcome="fenced") == 1
    assert (await sidecar.post("/v1/events", {"event": "after"})).status == 200
    live = redis_cluster.live_masters()[0]["port"]
    client = RedisCluster(host="127.0.0.1", port=live, decode_responses=True)  # type: ignore[arg-type]
    try:
        assert daily_totals(client, keys) == {"warm": 1, "after": 1}
    finally:
        client.close()


async def test_ask_sends_asking_and_the_command_to_the_importing_node(
        redis_cluster: RedisClusterServers, sidecar_config, pipeline: str) -> None:
    """A slot half-migrated by hand: a single-key command for a key not on the source follows ASK
    (ASKING + command on one connection, the map unchanged) and lands on the importing node."""
    keys = PipelineKeys(pipeline)
    source = redis_cluster.owner_of_slot(keys.slot)
    target = next(m for m in redis_cluster.live_masters() if m["id"] != source["id"])
    src = redis.Redis(port=source["port"])  # type: ignore[arg-type]
    dst = redis.Redis(port=target["port"])  # type: ignore[arg-type]
    committer = GroupCommitter(sidecar_config(redis_url=redis_cluster.url), fence_deadline_seconds=30)
    try:
        dst.execute_command("CLUSTER", "SETSLOT", keys.slot, "IMPORTING", source["id"])
        src.execute_command("CLUSTER", "SETSLOT", keys.slot, "MIGRATING", target["id"])
        token = keys.group_commit("ask-test")
        assert await committer.fence(token) is None  # the fence won, on the importing node
        assert metric_value(committer, REDIRECTS, kind="ask") == 1
        assert metric_value(committer, REDIRECTS, kind="moved") == 0
        assert committer.topology.owner(keys.slot) == f"127.0.0.1:{source['port']}"  # ASK changes no map
        pipe = dst.pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(token)
        assert pipe.execute()[1] == b"fenced"
        with pytest.raises(redis.exceptions.AskError):  # the source does not have it: it asks us elsewhere
            src.exists(token)
    finally:
        await committer.close()
        for client in (src, dst):
            client.execute_command("CLUSTER", "SETSLOT", keys.slot, "STABLE")
            client.close()


def metric_value(committer: GroupCommitter, name: str, **labels: str) -> float:
    return committer.metrics.registry.get_sample_value(name, labels) or 0.0
