"""The sidecar's two listeners, as in a pod: ingest/queries/dashboard on loopback only, and a probe listener
on every address (the pod IP) that serves /healthz, /readyz and /metrics and nothing else. A real HTTP client
talks to both, over a second local address standing in for the pod IP."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from datetime import UTC, datetime

import aiohttp
import pytest
import redis.asyncio as aioredis
from sidecar_helpers import first_event_accepted

from analytics_pipeline.core.keys import PipelineKeys
from analytics_pipeline.core.services import free_port
from analytics_pipeline.operator import crd, render
from analytics_pipeline.sidecar.server import serve


def pod_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1 that a client can connect to (the "pod IP")."""
    found = ["127.0.0.2"]  # the whole 127/8 is local on Linux, but a socket bound to 127.0.0.1 ignores it
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return found
    if not address.startswith("127."):
        found.append(address)
    return found


async def status(session: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> int:
    async with session.request(method, url, **kwargs) as answer:  # type: ignore[arg-type]
        await answer.read()
        return answer.status


async def refused(url: str) -> bool:
    """True when nothing listens there (connection refused)."""
    try:
        async with aiohttp.ClientSession() as session:
            await status(session, "GET", url)
    except aiohttp.ClientConnectionError:
        return True
    return False


async def test_ingest_stays_on_loopback_and_the_probe_listener_serves_only_probes(
        sidecar_config, redis_client: aioredis.Redis, keys: PipelineKeys) -> None:  # type: ignore[no-untyped-def]
    port, health_port = free_port(), free_port()
    config = sidecar_config(server={"host": "127.0.0.1", "port": port, "health_host": "0.0.0.0",
                                    "health_port": health_port})
    stop = asyncio.Event()
    server = asyncio.create_task(serve(config, stop=stop))
    try:
        assert await first_event_accepted(port, 200, 0.02)  # the app, on loopback: ingest works
        async with aiohttp.ClientSession() as session:
            main = f"http://127.0.0.1:{port}"
            assert await status(session, "GET", f"{main}/healthz") == 200  # probes answer on loopback too
            for address in pod_addresses():
                probes = f"http://{address}:{health_port}"
                assert await status(session, "GET", f"{probes}/healthz") == 200
                assert await status(session, "GET", f"{probes}/readyz") == 200  # real Redis answers PING
                async with session.get(f"{probes}/metrics") as answer:
                    assert answer.status == 200
                    assert "analytics_sidecar_events_accepted_total 1.0" in await answer.text()
                # Nothing else: no ingest (in any of its forms), no queries, no dashboard.
                for method, path in (("POST", "/v1/events"), ("POST", "/v1/track"), ("POST", "/v1/batch"),
                                     ("GET", "/v1/counts"), ("GET", "/v1/uniques"), ("GET", "/")):
                    kwargs = {"json": {"event": "intruder"}} if method == "POST" else {}
                    assert await status(session, method, f"{probes}{path}", **kwargs) in (404, 405), path
                # And the main listener cannot be reached on the pod address at all.
                assert await refused(f"http://{address}:{port}/healthz")
        # Only the app's one event was counted: the POSTs to the probe listener were never handled.
        daily = await redis_client.hgetall(keys.daily(datetime.now(UTC)))
        assert {field: int(value) for field, value in daily.items()} == {"a": 1}
    finally:
        stop.set()
        assert await asyncio.wait_for(server, 30) == 0
    assert await refused(f"http://127.0.0.1:{health_port}/healthz")  # closed with the sidecar


async def test_probe_listener_port_in_use_is_a_clear_error(sidecar_config,
                                                           caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    taken = blocker.sockets[0].getsockname()[1]
    try:
        config = sidecar_config(server={"port": free_port(), "health_host": "127.0.0.1", "health_port": taken})
        assert await serve(config) == 1
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert any("probe listener" in record.getMessage() for record in caplog.records)


async def test_the_operators_rendered_config_runs_a_sidecar_with_both_listeners(
        tmp_path, redis_url: str, pipeline: str,
        redis_client: aioredis.Redis) -> None:  # type: ignore[no-untyped-def]  # redis_client: cleans the keys
    """The ConfigMap's config.yaml as the operator renders it, run by the real `analytics-pipeline sidecar`
    command: ingest on loopback only, probes on every address."""
    port, health_port = free_port(), free_port()
    namespace, name = pipeline.split("/")
    spec = {"redis": {"secretRef": {"name": "c"}}, "postgres": {"secretRef": {"name": "c"}},
            "sidecar": {"port": port, "healthPort": health_port}}
    desired = render.desired_state(namespace, name, spec, default_image="img:1")
    config_file = tmp_path / crd.CONFIG_KEY
    config_file.write_text(desired.configmap["data"][crd.CONFIG_KEY], encoding="utf-8")
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("ANALYTICS_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "analytics_pipeline", "sidecar", "--config", str(config_file), "--no-reload",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert await first_event_accepted(port, 500, 0.02)
        async with aiohttp.ClientSession() as session:
            address = pod_addresses()[-1]
            assert await status(session, "GET", f"http://{address}:{health_port}/readyz") == 200
            assert await status(session, "POST", f"http://{address}:{health_port}/v1/events",
                                json={"event": "x"}) in (404, 405)
            assert await refused(f"http://{address}:{port}/healthz")
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
