"""The baseline of benchmarks/ingest.py: what a naive sidecar does for every event (aiohttp + redis-py).

Per request: ``await request.json()``, then for every event one redis-py pipeline (MULTI/EXEC, so it is
as atomic as the project's write) of INCR + EXPIRE on a daily, an hourly and a per-user daily key and
SADD of those keys to a pending set, awaited before the 200. No validation beyond "has an event name".
Keys: ``naive:{<pipeline>}:d:YYYYMMDD:<event>``, ``...:h:YYYYMMDDHH:<event>``,
``...:u:YYYYMMDD:<event>:<user>``, ``naive:{<pipeline>}:pending``.

    python benchmarks/baseline/naive_sidecar.py --port 8800 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

TTL_SECONDS = 7 * 86400
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)
PREFIX: web.AppKey[str] = web.AppKey("prefix", str)


async def post_events(request: web.Request) -> web.Response:
    """Count every event of the request with its own INCR/EXPIRE/SADD pipeline, then answer 200."""
    document: Any = await request.json()
    events = document if isinstance(document, list) else document.get("batch", [document])
    if not events or not all(isinstance(e, dict) and isinstance(e.get("event"), str) for e in events):
        return web.json_response({"error": "invalid_events"}, status=400)
    client = request.app[REDIS]
    prefix = request.app[PREFIX]
    for event in events:
        now = datetime.now(UTC)
        day, hour = now.strftime("%Y%m%d"), now.strftime("%Y%m%d%H")
        name = event["event"]
        keys = [f"{prefix}d:{day}:{name}", f"{prefix}h:{hour}:{name}"]
        user = event.get("user_id")
        if isinstance(user, str):
            keys.append(f"{prefix}u:{day}:{name}:{user}")
        async with client.pipeline() as pipe:
            for key in keys:
                pipe.incr(key)
                pipe.expire(key, TTL_SECONDS)
            pipe.sadd(f"{prefix}pending", *keys)
            await pipe.execute()
    return web.json_response({"accepted": len(events), "duplicates": 0}, status=200)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(redis_url: str, pipeline: str) -> web.Application:
    app = web.Application(client_max_size=512_001)
    app[REDIS] = aioredis.Redis.from_url(redis_url)
    app[PREFIX] = f"naive:{{{pipeline}}}:"
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/healthz", healthz)

    async def close_redis(app: web.Application) -> None:
        await app[REDIS].aclose()

    app.on_cleanup.append(close_redis)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--pipeline", default="bench/naive")
    args = parser.parse_args()
    # The plain asyncio loop, as a naive service would run (web.run_app's default).
    web.run_app(build_app(args.redis_url, args.pipeline), host="127.0.0.1", port=args.port,
                access_log=None, print=None, backlog=1024)


if __name__ == "__main__":
    main()
