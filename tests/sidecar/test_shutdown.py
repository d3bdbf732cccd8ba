"""SIGTERM during load: the real ``analytics-pipeline sidecar`` process drains, exits 0, and loses no acked event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from sidecar_helpers import grand_total, kind_totals

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import free_port


async def _wait_ready(url: str, process: subprocess.Popen[bytes], within: float = 20) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the sidecar exited while starting"
            try:
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("the sidecar did not become ready")


def _spawn(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


async def test_sigterm_under_load_loses_no_acked_event(
        tmp_path: Path, redis_url: str, pipeline: str, keys: PipelineKeys, redis_client: aioredis.Redis) -> None:
    port = free_port()
    config_file = tmp_path / "sidecar.yaml"
    # A wide window keeps requests waiting in the committer when SIGTERM arrives: they must be drained.
    config_file.write_text("server:\n  group_commit_window_ms: 25\n  shutdown_timeout_seconds: 15\n")
    env = {**os.environ, "REDIS_URL": redis_url, "ANALYTICS_PIPELINE": pipeline}
    env.pop("ANALYTICS_CONFIG", None)
    log_file = tmp_path / "sidecar.log"
    process = _spawn([sys.executable, "-m", "analytics_pipeline", "sidecar", "--config", str(config_file),
                      "--port", str(port), "--log-format", "json"], env, log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(url, process)
        acked: dict[str, int] = {}
        failures = 0
        sent_after_term = 0
        terminated = asyncio.Event()
        flowing = asyncio.Event()  # more than 100 events acked: the load really flows

        async def client(number: int, session: aiohttp.ClientSession) -> None:
            nonlocal failures, sent_after_term
            request = 0
            while True:
                request += 1
                events = [{"event": f"e{(number + n) % 3}", "user_id": f"u{number}"} for n in range(1 + request % 4)]
                try:
                    async with session.post(url + "/v1/events", json=events) as response:
                        body = await response.json()
                        if response.status != 200:
                            assert response.status == 503, body
                            continue
                        assert body == {"accepted": len(events), "duplicates": 0}
                        for event in events:
                            acked[event["event"]] = acked.get(event["event"], 0) + 1
                        if sum(acked.values()) > 100:
                            flowing.set()
                        if terminated.is_set():
                            sent_after_term += 1
                except (TimeoutError, aiohttp.ClientConnectionError):
                    failures += 1
                    if terminated.is_set():
                        return
                    await asyncio.sleep(0.01)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, force_close=False)) as session:
            load = [asyncio.create_task(client(n, session)) for n in range(24)]
            # SIGTERM once the load has really flowed, however slow the machine: a fixed 0.8 s sleep made
            # the "> 100 acked" below depend on machine speed. 60 s bounds a hang.
            await asyncio.wait_for(flowing.wait(), 60)
            process.send_signal(signal.SIGTERM)
            terminated.set()
            await asyncio.wait_for(asyncio.gather(*load), 30)
        code = await asyncio.to_thread(process.wait, 30)
        assert code == 0, log_file.read_text()
        assert sum(acked.values()) > 100
        assert await kind_totals(redis_client, keys, "d") == acked
        assert await kind_totals(redis_client, keys, "h") == acked
        assert await grand_total(redis_client, keys, "u") == sum(acked.values())
        lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
        started = next(line for line in lines if line.get("event") == "started")
        assert started["pipeline"] == pipeline and started["addresses"] == [url]
        assert started["granularities"] == ["daily", "hourly", "user_daily"]
        assert any(line.get("event") == "stopped" for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
