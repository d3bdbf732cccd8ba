"""The Docker image built for real and run as the chart runs it: uid 10001, read-only root, no capabilities.

Builds with ``DOCKER_HOST`` or a private dockerd on a debootstrapped Debian base (tests/imagebuild.py), then
runs ``migrate``, the sidecar and ``flush`` against this machine's Redis and PostgreSQL (host network).
Skipped, with the reason, where the machine cannot build (not root, no docker.io or debootstrap).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import asyncpg
import imagebuild
import pytest
import redis

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PIPELINES_SET, PipelineKeys
from analytics_pipeline.core.services import free_port

# debootstrap (first run) and the build take minutes on a busy machine: more than the suite's 300 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# How the chart and the operator run the containers, plus the host network (the private engine has no bridge).
LOCKED_DOWN = ("--network", "host", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


@pytest.fixture(scope="module")
def image() -> Iterator[tuple[imagebuild.Engine, str]]:
    """The image built once for this module under a tag of its own; the engine is torn down afterwards."""
    reason = imagebuild.unavailable_reason()
    if reason:
        pytest.skip(f"cannot build the image on this machine: {reason}")
    tag = f"analytics-pipeline:test-{uuid.uuid4().hex[:8]}"
    with imagebuild.docker_engine() as engine:
        started = time.monotonic()
        base = imagebuild.base_image(engine)
        base_seconds = time.monotonic() - started
        built = imagebuild.build(engine, base, tag)
        print(f"\n[image] engine {'private dockerd' if engine.private else engine.host}; base ready in "
              f"{base_seconds:.0f} s; {built.describe()}")
        try:
            yield engine, tag
        finally:
            engine.run("image", "rm", "-f", tag, check=False)


def run(image: tuple[imagebuild.Engine, str], *args: str, env: dict[str, str] | None = None,
        entrypoint: str | None = None) -> str:
    """One locked-down container to completion; its stdout (stderr goes into the failure message)."""
    engine, tag = image
    options = [*LOCKED_DOWN, *(f"--env={name}={value}" for name, value in (env or {}).items())]
    if entrypoint:
        options.append(f"--entrypoint={entrypoint}")
    return engine.run("run", "--rm", *options, tag, *args, timeout=300).stdout


def test_runs_as_uid_10001_on_a_read_only_root_without_installers(image: tuple[imagebuild.Engine, str]) -> None:
    # /tmp (the WORKDIR) is world-writable in the image: only the read-only root can refuse the write.
    probe = ("import importlib.util, json, os, re, shutil\n"
             "try:\n    open('/tmp/probe', 'w'); writable = True\nexcept OSError as e:\n    writable = e.errno\n"
             "caps = re.search(r'CapEff:\\s*(\\w+)', open('/proc/self/status').read()).group(1)\n"
             "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'cwd': os.getcwd(), 'writable': writable,"
             " 'capabilities': int(caps, 16), 'pip': importlib.util.find_spec('pip') is not None,"
             " 'compilers': [c for c in ('gcc', 'cc', 'make') if shutil.which(c)]}))")
    facts = json.loads(run(image, "-c", probe, entrypoint="python3"))
    print(f"\n[image] {facts}")
    assert facts == {"uid": 10001, "gid": 10001, "cwd": "/tmp", "writable": 30,  # 30: EROFS
                     "capabilities": 0, "pip": False, "compilers": []}
    assert imagebuild.VERSION in run(image, "--version")


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def _daily_count(database_url: str, pipeline: str, event: str) -> int | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT sum(count) FROM analytics_daily WHERE pipeline = $1 AND event_type = $2",
                                   pipeline, event)
    finally:
        await conn.close()


async def _delete_rows(database_url: str, pipeline: str) -> None:
    """This test's rows in every table that has a pipeline column (the database is shared)."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch("SELECT table_name FROM information_schema.columns WHERE column_name = 'pipeline'"
                                  " AND table_schema = current_schema() AND table_name LIKE 'analytics%'")
        for row in tables:
            await conn.execute(f'DELETE FROM "{row["table_name"]}" WHERE pipeline = $1', pipeline)
    finally:
        await conn.close()


def test_migrate_sidecar_and_flush_against_real_services(image: tuple[imagebuild.Engine, str], config: Config) -> None:
    engine, tag = image
    env = {"REDIS_URL": config.redis_url, "DATABASE_URL": config.database_url, "ANALYTICS_PIPELINE": config.pipeline}
    name = f"ap-sidecar-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        print(f"\n[image] migrate: {run(image, 'migrate', env=env).strip()}")
        engine.run("run", "--detach", "--name", name, *LOCKED_DOWN,
                   *(f"--env={key}={value}" for key, value in env.items()),
                   tag, "sidecar", "--port", str(port), "--no-reload")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                status, body = _http("GET", f"{base}/healthz")
                break
            except OSError:
                state = engine.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                logs = engine.run("logs", name, check=False)
                assert state == "true" and time.monotonic() < deadline, \
                    f"the sidecar did not answer (running: {state}):\n{logs.stdout}{logs.stderr}"
                time.sleep(0.5)
        print(f"[image] GET /healthz -> {status} {body.strip()}")
        assert status == 200
        events = json.dumps([{"event": "image_smoke", "user_id": f"u{n}"} for n in range(3)]).encode()
        status, body = _http("POST", f"{base}/v1/events", events)
        print(f"[image] POST /v1/events (3 events) -> {status} {body.strip()}")
        assert 200 <= status < 300 and json.loads(body)["accepted"] == 3
        summary = json.loads(run(image, "flush", env=env).strip().splitlines()[-1])
        print(f"[image] flush: ok={summary['ok']} buckets={summary['buckets']} rows={summary['rows']}")
        assert summary["ok"] and summary["buckets"] > 0
        assert asyncio.run(_daily_count(config.database_url, config.pipeline, "image_smoke")) == 3
        logs = engine.run("logs", name).stderr
        assert "Traceback" not in logs, logs
    finally:
        engine.run("rm", "--force", name, check=False)
        asyncio.run(_delete_rows(config.database_url, config.pipeline))
        client = redis.Redis.from_url(config.redis_url)
        try:
            client.srem(PIPELINES_SET, config.pipeline)
            keys = list(client.scan_iter(match=PipelineKeys(config.pipeline).scan_pattern, count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
