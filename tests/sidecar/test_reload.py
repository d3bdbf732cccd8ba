"""Live config reload: a changed file changes limits and TTL without a restart; a bad file is ignored."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis
import yaml
from sidecar_helpers import SidecarFactory
from support import fresh_ttls

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import CONFIG, STATE


async def _wait_for(predicate, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_config_file_changes_apply_live(tmp_path: Path, start_sidecar: SidecarFactory, sidecar_config,
                                              redis_client: aioredis.Redis, keys: PipelineKeys,
                                              monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = sidecar_config()
    monkeypatch.setenv("REDIS_URL", config.redis_url)
    monkeypatch.setenv("ANALYTICS_PIPELINE", config.pipeline)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_file_dict()))
    sidecar = await start_sidecar(config, config_path=path, reload_interval=0.05)
    assert (await sidecar.post("/v1/events", [{"event": "a"}] * 4)).status == 200

    changed = config.to_file_dict()
    changed["ingest"]["max_batch_events"] = 3
    changed["counters"] = {"ttl_seconds": 7200, "granularities": ["daily"]}
    path.write_text(yaml.safe_dump(changed))
    await _wait_for(lambda: sidecar.app[CONFIG].ingest.max_batch_events == 3)
    assert (await sidecar.post("/v1/events", [{"event": "a"}] * 4)).status == 413
    since = time.monotonic()
    assert (await sidecar.post("/v1/events", {"event": "b"})).status == 200
    now = datetime.now(UTC)
    assert await redis_client.ttl(keys.daily(now)) in fresh_ttls(7200, since)
    assert await redis_client.hgetall(keys.hourly(now)) == {"a": "4"}  # hourly is off now: no "b"

    path.write_text("ingest:\n  max_batch_events: -1\n")
    await _wait_for(lambda: sidecar.metrics.config_reloads.labels("invalid")._value.get() == 1)
    assert sidecar.app[CONFIG].ingest.max_batch_events == 3
    assert sidecar.app[STATE].validator.max_batch_events == 3
    assert sidecar.metrics.config_reloads.labels("applied")._value.get() == 1
