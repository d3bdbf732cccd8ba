"""Live reload with a ConfigMap volume as kubelet writes it: timestamped folder, ``..data`` symlink swap."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml
from sidecar_helpers import SidecarFactory
from support import fresh_ttls

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.sidecar.appkeys import CONFIG


class KubeletVolume:
    """Writes a ConfigMap volume the way kubelet's AtomicWriter does.

    ``config.yaml -> ..data/config.yaml`` and ``..data -> ..<timestamp>``; an update writes a new
    timestamped folder, points ``..data_tmp`` at it and renames that over ``..data`` (atomic), then
    removes the old folder. The file the sidecar was started with is never written in place.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        root.mkdir()
        (root / "config.yaml").symlink_to("..data/config.yaml")

    def publish(self, text: str) -> None:
        self.generation += 1
        folder = self.root / f"..2026_11_27_10_00_00.{self.generation:09d}"
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.rename(tmp, data)
        if old:
            for child in (self.root / old).iterdir():
                child.unlink()
            (self.root / old).rmdir()


async def _eventually(predicate: Any, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_symlink_swap_applies_new_ttl_and_an_invalid_file_keeps_the_old_config(
        tmp_path: Path, start_sidecar: SidecarFactory, sidecar_config, redis_client: aioredis.Redis,
        keys: PipelineKeys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = sidecar_config()
    monkeypatch.setenv("REDIS_URL", config.redis_url)
    monkeypatch.setenv("ANALYTICS_PIPELINE", config.pipeline)
    volume = KubeletVolume(tmp_path / "analytics-config")
    volume.publish(yaml.safe_dump(config.to_file_dict()))
    sidecar = await start_sidecar(config, config_path=volume.root / "config.yaml", reload_interval=0.05)
    reloads = sidecar.metrics.config_reloads

    since = time.monotonic()
    assert (await sidecar.post("/v1/events", {"event": "before"})).status == 200
    now = datetime.now(UTC)
    assert await redis_client.ttl(keys.daily(now)) in fresh_ttls(7 * 86400, since)  # the default TTL

    # The operator changes the TTL: kubelet swaps ..data; the next write carries the new TTL.
    changed = config.to_file_dict()
    changed["counters"]["ttl_seconds"] = 3600
    volume.publish(yaml.safe_dump(changed))
    await _eventually(lambda: sidecar.app[CONFIG].counters.ttl_seconds == 3600)
    assert reloads.labels("applied")._value.get() == 1
    since = time.monotonic()
    assert (await sidecar.post("/v1/events", {"event": "after"})).status == 200
    assert await redis_client.ttl(keys.daily(datetime.now(UTC))) in fresh_ttls(3600, since)
    assert await redis_client.hget(keys.daily(datetime.now(UTC)), "after") == "1"

    # A broken file is refused: the config in force stays, a metric counts it, readiness stays green.
    volume.publish("counters:\n  ttl_seconds: 12\n")
    await _eventually(lambda: reloads.labels("invalid")._value.get() == 1)
    assert sidecar.app[CONFIG].counters.ttl_seconds == 3600
    assert (await sidecar.get("/readyz")).status == 200
    since = time.monotonic()
    assert (await sidecar.post("/v1/events", {"event": "still"})).status == 200
    assert await redis_client.ttl(keys.daily(datetime.now(UTC))) in fresh_ttls(3600, since)

    # A good file after the bad one is applied again.
    changed["counters"]["ttl_seconds"] = 7200
    volume.publish(yaml.safe_dump(changed))
    await _eventually(lambda: sidecar.app[CONFIG].counters.ttl_seconds == 7200)
    assert reloads.labels("applied")._value.get() == 2
