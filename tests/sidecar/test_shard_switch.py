"""The sidecar's shard (core/keys.sidecar_shard_tag of its pod name): counters.shards changed by a live
reload sends later batches to the pod's new shard tag, registered in ap:pipelines and shown as a metric."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from cluster_load import metric, wait_for
from sidecar_helpers import SidecarFactory

from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys, sidecar_shard_tag
from analytics_pipeline.sidecar.appkeys import STATE


@pytest.fixture
async def shard_cleanup(redis_client: aioredis.Redis) -> AsyncIterator[list[str]]:
    """Tags to remove (keys and ap:pipelines entry) after the test: the shared Redis stays clean."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        found = [key async for key in redis_client.scan_iter(match=PipelineKeys.of_tag(tag).scan_pattern)]
        if found:
            await redis_client.delete(*found)
        await redis_client.srem(PIPELINES_SET, tag)


async def test_reload_of_shards_moves_later_batches_to_the_pods_new_tag(
        tmp_path: Path, start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis,
        keys: PipelineKeys, shard_cleanup: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = keys.pipeline
    names = (f"web-{n}" for n in itertools.count())
    pod = next(name for name in names if sidecar_shard_tag(pipeline, 3, name) != pipeline)
    new_tag = sidecar_shard_tag(pipeline, 3, pod)
    shard_cleanup.append(new_tag)
    monkeypatch.setenv("POD_NAME", pod)
    config = sidecar_config()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_file_dict()))
    sidecar = await start_sidecar(config, config_path=path, reload_interval=0.05)
    assert (await sidecar.post("/v1/events", {"event": "before"})).status == 200
    assert metric(sidecar, "analytics_sidecar_shard", tag=pipeline) == 1

    changed = config.to_file_dict()
    changed["counters"] = {**changed.get("counters", {}), "shards": 3}
    path.write_text(yaml.safe_dump(changed))
    await wait_for(lambda: sidecar.app[STATE].committer.keys.tag == new_tag, what="the reload")
    assert (await sidecar.post("/v1/events", [{"event": "after"}, {"event": "after"}])).status == 200

    today = datetime.now(UTC)
    assert await redis_client.hgetall(keys.daily(today)) == {"before": "1"}
    assert await redis_client.hgetall(PipelineKeys.of_tag(new_tag).daily(today)) == {"after": "2"}
    assert await redis_client.sismember(PIPELINES_SET, new_tag)
    assert metric(sidecar, "analytics_sidecar_shard", tag=new_tag) == 1
    assert metric(sidecar, "analytics_sidecar_shard", tag=pipeline) == 0
    assert (await sidecar.get("/readyz")).body["shard"] == new_tag
