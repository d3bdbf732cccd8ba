"""An ingest-only sidecar never loads the read path's libraries (redis-py, asyncpg, queries, renderer),
and no sidecar path (ingest, probes, queries, dashboard) ever loads the flusher.

They are ~11 MB of resident memory in a process that idles at ~50 MB. The check runs the real app
in a fresh interpreter (this one has long imported everything) against the real Redis: ingest,
readiness and metrics must leave them unloaded; the first query loads them and works through
``app[REDIS]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis
from support import REPO

from analytics_pipeline.core.config import Config
from analytics_pipeline.core.keys import PipelineKeys

HEAVY = ("redis", "asyncpg", "analytics_pipeline.reads.queries", "analytics_pipeline.reads.dashboard_render",
         "analytics_pipeline.core.postgres")

SCRIPT = r"""
import asyncio, json, sys
from aiohttp.test_utils import TestClient, TestServer
from analytics_pipeline.core.config import parse_config
from analytics_pipeline.sidecar.app import create_app
from analytics_pipeline.sidecar.appkeys import REDIS

HEAVY = %(heavy)r

def loaded():
    return sorted(name for name in HEAVY if name in sys.modules)

def flusher_modules():
    return sorted(name for name in sys.modules if name.startswith("analytics_pipeline.flusher"))

async def main():
    app = create_app(parse_config(json.loads(sys.argv[1])))
    report = {"after_create_app": loaded()}
    async with TestClient(TestServer(app)) as client:
        answer = await client.post("/v1/events", json=[{"event": "a", "user_id": "u"}, {"event": "b"}])
        report["ingest"] = [answer.status, await answer.json()]
        report["readyz"] = (await client.get("/readyz")).status
        report["metrics"] = (await client.get("/metrics")).status
        report["after_ingest"] = loaded()
        report["counts"] = (await client.get("/v1/counts?event=a")).status
        report["after_query"] = loaded()
        report["dashboard"] = (await client.get("/")).status
        report["flusher_modules"] = flusher_modules()
        report["redis_ping"] = await app[REDIS].ping()
    print(json.dumps(report))

asyncio.run(main())
"""


async def test_ingest_probes_and_metrics_do_not_load_the_read_path(config: Config, tmp_path: Path,
                                                                    redis_client: aioredis.Redis,
                                                                    keys: PipelineKeys) -> None:
    script = tmp_path / "lazy.py"
    script.write_text(SCRIPT % {"heavy": HEAVY})
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), json.dumps(config.as_dict()), cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    assert report["ingest"] == [200, {"accepted": 2, "duplicates": 0}]
    assert report["readyz"] == 200 and report["metrics"] == 200
    assert report["after_create_app"] == [] and report["after_ingest"] == []
    # The first read request loads them (200, or 503 if the shared test database lacks the tables).
    assert report["counts"] in (200, 503)
    assert set(report["after_query"]) == {"redis", "asyncpg", "analytics_pipeline.reads.queries",
                                          "analytics_pipeline.core.postgres"}
    assert report["redis_ping"] is True
    # The read side shares the PostgreSQL helpers through core, never through the flusher.
    assert report["dashboard"] in (200, 503)
    assert report["flusher_modules"] == []
    assert await redis_client.hgetall(keys.daily(datetime.now(UTC))) == {"a": "1", "b": "1"}
